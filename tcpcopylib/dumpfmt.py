"""Human, JSON and pcap renderings of records (tc-dump's library).

``TextFormatter.line(rec)`` gives one tcpdump-like line per record; ``to_json`` /
``from_json`` convert a record to and from one JSON object losslessly: bytes become
``{"$bytes": "<base64>"}`` and a CBOR tag becomes ``{"$tag": N, "value": ...}``;
ints, strings, lists, maps with string keys, floats, booleans and null are kept as is.
``write_pcap`` and ``records_from_json`` are tc-dump's --pcap and --from-json loops;
``TextOut`` its buffered text output.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time

from tcpcopylib.errors import StreamError
from tcpcopylib.packet import TH_ACK, TH_FIN, TH_RST, TH_SYN, TH_URG, flags_str, ip_str, parse_tcp

_PKT_KEYS = {"t", "ts", "data", "len", "sid"}


# -- JSON --------------------------------------------------------------------------------
def _json_default(o):
    if isinstance(o, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(o)).decode("ascii")}
    import cbor2

    if isinstance(o, cbor2.CBORTag):
        return {"$tag": o.tag, "value": o.value}
    if isinstance(o, (set, frozenset)):
        return list(o)
    raise TypeError(f"cannot represent {type(o).__name__} in JSON")


def to_json(rec) -> str:
    return json.dumps(rec, default=_json_default, separators=(",", ":"), ensure_ascii=False)


def _json_hook(d: dict):
    if len(d) == 1 and "$bytes" in d and isinstance(d["$bytes"], str):
        return base64.b64decode(d["$bytes"], validate=True)
    if len(d) == 2 and "$tag" in d and "value" in d:
        import cbor2

        return cbor2.CBORTag(d["$tag"], d["value"])
    return d


def from_json(line: str):
    """One JSON text -> the record it stands for; ValueError if it is not valid."""
    return json.loads(line, object_hook=_json_hook)


# -- text --------------------------------------------------------------------------------
def _value_str(v) -> str:
    if isinstance(v, str):
        return v if v and not any(c.isspace() or c in "\"=" for c in v) else json.dumps(v)
    if isinstance(v, (bytes, bytearray)):
        if len(v) <= 32:
            return "0x" + bytes(v).hex()
        return f"0x{bytes(v[:32]).hex()}...({len(v)} bytes)"
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return str(v)
    try:
        return json.dumps(v, default=_json_default, separators=(",", ":"))
    except (TypeError, ValueError):
        return repr(v)


def kv_str(rec: dict, skip=("t",)) -> str:
    return " ".join(f"{k}={_value_str(v)}" for k, v in rec.items() if k not in skip)


_OPT_NAMES = {0: "eol", 1: "nop"}


def tcp_options_str(opts: bytes) -> str:
    """tcpdump's rendering: 'mss 1460,sackOK,TS val 1 ecr 0,nop,wscale 7'."""
    out = []
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind in _OPT_NAMES:
            out.append(_OPT_NAMES[kind])
            i += 1
            if kind == 0:
                break
            continue
        if i + 1 >= n or opts[i + 1] < 2 or i + opts[i + 1] > n:
            out.append(f"opt-{kind} [bad length]")
            break
        ln = opts[i + 1]
        body = opts[i + 2:i + ln]
        if kind == 2 and ln == 4:
            out.append(f"mss {struct.unpack('!H', body)[0]}")
        elif kind == 3 and ln == 3:
            out.append(f"wscale {body[0]}")
        elif kind == 4 and ln == 2:
            out.append("sackOK")
        elif kind == 8 and ln == 10:
            val, ecr = struct.unpack("!II", body)
            out.append(f"TS val {val} ecr {ecr}")
        elif kind == 5 and (ln - 2) % 8 == 0:
            blocks = struct.unpack(f"!{(ln - 2) // 4}I", body)
            out.append("sack %d %s" % (len(blocks) // 2, " ".join(
                f"{{{blocks[j]}:{blocks[j + 1]}}}" for j in range(0, len(blocks), 2))))
        else:
            out.append(f"opt-{kind}:{body.hex()}")
        i += ln
    return ",".join(out)


def _ip_line(data) -> str:
    """'IP src.port > dst.port: ...' for one datagram, like tcpdump -nn."""
    n = len(data)
    v = data[0] >> 4 if n else 0
    if v == 4 and n >= 20:
        fam, src, dst, proto = "IP", data[12:16], data[16:20], data[9]
        ihl = (data[0] & 15) * 4
        tot = struct.unpack_from("!H", data, 2)[0]
        plen = max(0, (tot or n) - ihl)
    elif v == 6 and n >= 40:
        fam, src, dst, proto = "IP6", data[8:24], data[24:40], data[6]
        ihl = 40
        plen = struct.unpack_from("!H", data, 4)[0]
    else:
        return f"[not IP, {n} bytes]"
    t = parse_tcp(data)
    if t is not None:
        paylen = t.ip_len - t.payload_off
        if plen:  # use the header's length: the capture may hold less
            paylen = plen - t.doff
        s = (f"{fam} {ip_str(src)}.{t.sport} > {ip_str(dst)}.{t.dport}: "
             f"Flags [{flags_str(t.flags)}]")
        if paylen > 0 or t.flags & (TH_SYN | TH_FIN | TH_RST):
            s += f", seq {t.seq}"
            if paylen > 0:
                s += f":{(t.seq + paylen) & 0xFFFFFFFF}"
        if t.flags & TH_ACK:
            s += f", ack {t.ack}"
        s += f", win {t.window}"
        if t.flags & TH_URG:
            s += f", urg {struct.unpack_from('!H', data, t.ihl + 18)[0]}"
        if t.doff > 20:
            s += f", options [{tcp_options_str(t.options)}]"
        return s + f", length {paylen}"
    a, b = ip_str(src), ip_str(dst)
    if proto == 17 and n >= ihl + 8:
        sport, dport, ulen = struct.unpack_from("!HHH", data, ihl)
        return f"{fam} {a}.{sport} > {b}.{dport}: UDP, length {max(0, ulen - 8)}"
    if proto in (1, 58):
        return f"{fam} {a} > {b}: ICMP{'6' if proto == 58 else ''}, length {plen}"
    if proto == 6:
        return f"{fam} {a} > {b}: tcp (fragment or truncated), length {plen}"
    return f"{fam} {a} > {b}: ip-proto-{proto}, length {plen}"


class TextFormatter:
    """One line per record. Times are local (or UTC), like tcpdump's default."""

    def __init__(self, utc: bool = False, date: bool = False):
        self._tm = time.gmtime if utc else time.localtime
        self._fmt = "%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S"
        self._sec = None
        self._sec_str = ""

    def time_str(self, ts) -> str:
        if not isinstance(ts, int):
            return f"ts={_value_str(ts)}"
        sec, ns = divmod(ts, 1_000_000_000)
        if sec != self._sec:
            self._sec = sec
            try:
                self._sec_str = time.strftime(self._fmt, self._tm(sec))
            except (OverflowError, OSError, ValueError):
                self._sec_str = str(sec)
        return f"{self._sec_str}.{ns:09d}"

    def line(self, rec) -> str:
        if not isinstance(rec, dict):
            return f"? {_value_str(rec)}"
        t = rec.get("t")
        if t == "header":
            return f"# header v{rec.get('v')} {kv_str(rec, ('t', 'v'))}".rstrip()
        if t in ("pkt", "fb", "s2c"):
            data = rec.get("data")
            if isinstance(data, (bytes, bytearray)):
                return self._packet_line(t, rec, data)
        return f"{t if isinstance(t, str) else _value_str(t)} {kv_str(rec)}".rstrip()

    def _packet_line(self, t: str, rec: dict, data) -> str:
        parts = []
        if t != "pkt":
            parts.append(t)  # fb, s2c
        parts.append(self.time_str(rec.get("ts")))
        if "sid" in rec:
            parts.append(f"sid={_value_str(rec['sid'])}")
        parts.append(_ip_line(data))
        s = " ".join(parts)
        orig = rec.get("len")
        if isinstance(orig, int) and orig > len(data):
            s += f" [captured {len(data)} of {orig}]"
        extra = {k: v for k, v in rec.items() if k not in _PKT_KEYS}
        if extra:
            s += " {" + kv_str(extra, ()) + "}"
        return s


class TextOut:
    """Buffered text lines to an fd (flushed on idle, like RecordWriter)."""

    def __init__(self, fd: int, max_lines: int = 512):
        self.fd = fd
        self.lines: list[str] = []
        self.max_lines = max_lines

    def write(self, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) >= self.max_lines:
            self.flush()

    def flush(self) -> None:
        if not self.lines:
            return
        data = ("\n".join(self.lines) + "\n").encode("utf-8", "backslashreplace")
        self.lines.clear()
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


# -- pcap and JSON Lines conversions (tc-dump --pcap, --from-json) ---------------------------
_PCAP_REC = struct.Struct("<IIII").pack  # pcap record header: sec, nsec, caplen, len


def write_pcap(records, writer, kinds=("pkt",), counts=None) -> None:
    """The records of these kinds (their data and ts) into ``writer``, a pcapio.PcapWriter;
    ``counts[t]`` counts every record read by type. Flushed at the end, however it ends."""
    # PcapWriter.write, inlined: the hot loop of tc-dump --pcap
    buf, flush, bufsize, pack = writer.buf, writer.flush, writer.bufsize, _PCAP_REC
    counts = {} if counts is None else counts
    n = 0
    try:
        for rec in records:
            n += 1
            t = rec["t"]
            counts[t] = counts.get(t, 0) + 1
            if t not in kinds:
                continue
            data, ts = rec.get("data"), rec.get("ts")
            if type(ts) is not int or type(data) is not bytes:
                raise StreamError(f"record {n}: a {t} record without bytes 'data' and "
                                  f"integer 'ts'")
            orig = rec.get("len")
            size = len(data)
            try:
                buf += pack(ts // 1_000_000_000, ts % 1_000_000_000, size,
                            orig if type(orig) is int and orig > size else size)
            except struct.error:
                raise StreamError(f"record {n}: ts {ts} or len {orig} does not fit in a "
                                  f"pcap file") from None
            buf += data
            writer.packets += 1
            if len(buf) >= bufsize:
                flush()
    finally:
        flush()


def records_from_json(lines, name: str, count=None):
    """The records of JSON Lines text (as to_json writes them; blank lines and # comments
    skipped), each checked to be a record, headers to be of a known format version:
    StreamError naming ``name`` and the line otherwise. ``count(rec)`` is called for
    every record, before a header is checked."""
    from tcpcopylib.records import FORMAT_VERSION

    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            rec = from_json(line)
        except ValueError as e:
            raise StreamError(f"{name}:{lineno}: not a JSON record: {e}") from None
        if not isinstance(rec, dict) or "t" not in rec:
            raise StreamError(f"{name}:{lineno}: not a record (a JSON object with a \"t\" "
                              f"key)")
        if count is not None:
            count(rec)
        if rec["t"] == "header":
            v = rec.get("v")
            if not isinstance(v, int) or not 1 <= v <= FORMAT_VERSION:
                raise StreamError(f"{name}:{lineno}: header with unsupported format "
                                  f"version {v!r}")
        yield rec


def stream_from_json(inputs, writer_for, tool: str, count=None) -> None:
    """tc-dump --from-json: the records of JSON Lines ``inputs`` ((name, text file) pairs,
    read in order) written as a record stream. Its sections are those of the JSON headers
    (written as they are: the text is a stream shown, not a new stage); records before
    any header, or no record at all, get a header of ``tool``. ``writer_for(hdr)``: a
    RecordWriter starting with header ``hdr``; ``count(rec)`` as records_from_json."""
    from tcpcopylib.records import header

    writer = None
    try:
        for name, f in inputs:
            for rec in records_from_json(f, name, count):
                if rec["t"] == "header":
                    if writer is None:
                        writer = writer_for(rec)
                    else:
                        writer.new_section(rec)
                    continue
                if writer is None:
                    writer = writer_for(header(tool))
                writer.write(rec)
        if writer is None:
            writer = writer_for(header(tool))
    except UnicodeDecodeError as e:
        raise StreamError(f"not JSON Lines text: {e}") from None
    finally:
        if writer is not None:
            writer.flush()
