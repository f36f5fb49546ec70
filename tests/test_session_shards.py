"""tc-session --shards N: the session work in N processes, the same output as one.

The key (packet.session_shard): one owner per connection, both directions, every run.
In process (tc.call; the shards are real forked children): many sessions, IPv4 and IPv6,
ISNs near 2**32, captured SYNs and mid-stream starts, -n copies, batches in and out,
records of other layouts and types, a second section: each session sends the same
packets as in one process (client ports aside: each shard has its own -f block), the
counters add up, ids stay unique. As processes: pacing from one anchor, --max-gap,
signals, exit codes, SIGPIPE, no child left behind. In the netns lab (--send and the pipe
form): a real target receives every captured stream, byte for byte.
"""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time

import cbor2
import pytest
import tc
from seqnums import ISNS

import replay_harness as h
from tcpcopylib.packet import (TH_ACK, TH_FIN, TH_PSH, TH_RST, TH_SYN, build_tcp, ip_bytes,
                               parse_tcp, session_shard)
from tcpcopylib.records import encode_section, header
from tcpcopylib.session.alloc import PORT_HI, PORT_LO
from tcpcopylib.testing import pcap, tool_env, tool_path
from tcpcopylib.wire import PKT_TS_AT, encode_pkt, pkt_spans, scan_record

MS = 1_000_000
T0 = 1_700_000_000 * 10**9
MSS = b"\x02\x04\x05\xb4"
SERVER4, SERVER6 = ip_bytes("10.1.0.1"), ip_bytes("fd00:1::1")
TARGETS = ["-x", "80-10.2.0.5:80,[fd00:1::1]:80-[fd00:2::5]:80"]
SLACK_MS = 150  # a send may be this late on a loaded 2-core machine (test_session_cli)


# -- the key ---------------------------------------------------------------------------------

def test_session_shard_is_one_owner_per_connection_both_ways():
    n = 4
    seen = collections.Counter()
    for i in range(400):
        c, s = ip_bytes(f"10.9.{i // 200}.{i % 200 + 1}"), SERVER4
        up = build_tcp(c, s, 1024 + i * 37, 80, i, 0, TH_SYN)
        down = build_tcp(s, c, 80, 1024 + i * 37, 7, i + 1, TH_SYN | TH_ACK)
        k = session_shard(up, n)
        assert session_shard(down, n) == k and 0 <= k < n
        # an IPv4 header with options: the same connection, the same owner
        opt = bytearray(up[:20] + b"\x01\x01\x01\x00" + up[20:])
        opt[0] = 0x46
        assert session_shard(bytes(opt), n) == k
        # and at an offset in a larger buffer (as the parent finds it in a record)
        assert session_shard(b"xx" + up + b"yy", n, 2, 2 + len(up)) == k
        c6 = ip_bytes(f"fd00:9::{i + 1:x}")
        up6 = build_tcp(c6, SERVER6, 2000 + i, 80, i, 0, TH_SYN)
        down6 = build_tcp(SERVER6, c6, 80, 2000 + i, 1, i + 1, TH_SYN | TH_ACK)
        assert session_shard(up6, n) == session_shard(down6, n)
        seen[k] += 1
        seen[session_shard(up6, n)] += 1
    assert set(seen) == set(range(n)) and min(seen.values()) > 120, seen  # spread
    for junk in (b"", b"\x45" * 10, b"\x00" * 40, bytes([0x60]) + bytes(30)):
        assert session_shard(junk, n) == 0
    assert session_shard(up, 1) == 0


def test_session_shard_is_the_same_in_every_process():
    """Not Python's salted hash of bytes: another interpreter with another hash seed puts
    every connection where this one does."""
    datas = [build_tcp(ip_bytes(f"10.9.0.{i + 1}"), SERVER4, 3000 + i, 80, i, 0, TH_SYN)
             for i in range(50)]
    here = [session_shard(d, 3) for d in datas]
    code = ("import sys; from tcpcopylib.packet import session_shard; "
            "print([session_shard(bytes.fromhex(x), 3) for x in sys.argv[1:]])")
    for seed in ("1", "12345"):
        r = subprocess.run([sys.executable, "-c", code, *(d.hex() for d in datas)],
                           capture_output=True, text=True, check=True,
                           env=tool_env(PYTHONHASHSEED=seed))
        assert r.stdout.strip() == str(here)


def test_pkt_spans_finds_the_usual_records_as_scan_record_does():
    d1, d2 = build_tcp(SERVER4, SERVER4, 1, 2, 3, 4, TH_ACK), build_tcp(
        SERVER4, SERVER4, 1, 2, 3, 4, TH_ACK, payload=b"x" * 400)
    buf = encode_pkt(T0, d1) + encode_pkt(T0 + 1, d2) + encode_pkt(T0 + 2, d1, 99)
    spans = pkt_spans(buf, 0)
    assert len(spans) == 2  # the third has a "len": another layout
    pos = 0
    for (d0, end), want in zip(spans, (d1, d2)):
        r = scan_record(buf, pos, len(buf))
        assert (r[4], r[5], r[3]) == (d0, end, end) and buf[d0:end] == want
        assert int.from_bytes(buf[pos + PKT_TS_AT:pos + PKT_TS_AT + 8], "big") == r[1]
        pos = end
    assert pkt_spans(buf[:spans[1][1] - 1], 0) == spans[:1]  # an incomplete one: not yet
    assert pkt_spans(cbor2.dumps({"t": "pkt", "ts": T0, "data": d1, "sid": 1}), 0) == []


# -- the same output as one process ------------------------------------------------------

def sessions_stream(n, isns, v6_every=4, batch_every=0):
    """n client sessions (IPv4 and every v6_every-th IPv6), ISNs from the seqnums
    fixture's values: a third begin with a captured SYN (then data and a FIN), the others
    mid-stream; the server's answers in the capture too; a note record, a packet cut by
    the capture ("len"), a second section halfway. As records (dicts)."""
    cisn, sisn = int(isns.client), int(isns.server)
    recs = []
    for i in range(n):
        v6 = v6_every and i % v6_every == 0
        c = ip_bytes(f"fd00:9::{i + 1:x}" if v6 else f"10.9.{i // 250}.{i % 250 + 1}")
        s = SERVER6 if v6 else SERVER4
        port = 1024 + (i * 7919) % 60000
        ts = T0 + i * 10_000
        seq = (cisn + i * 1_000_003) & 0xFFFFFFFF
        ack = (sisn + i) & 0xFFFFFFFF
        if i % 3 == 0:
            recs.append({"t": "pkt", "ts": ts, "data": build_tcp(c, s, port, 80, seq, 0,
                                                                   TH_SYN, options=MSS)})
            recs.append({"t": "pkt", "ts": ts + 1, "data": build_tcp(
                s, c, 80, port, ack, (seq + 1) & 0xFFFFFFFF, TH_SYN | TH_ACK)})
            seq = (seq + 1) & 0xFFFFFFFF
        body = b"GET /%d HTTP/1.1\r\n\r\n" % i
        recs.append({"t": "pkt", "ts": ts + 2, "data": build_tcp(
            c, s, port, 80, seq, ack, TH_ACK | TH_PSH, payload=body)})
        recs.append({"t": "pkt", "ts": ts + 3, "data": build_tcp(
            c, s, port, 80, (seq + len(body)) & 0xFFFFFFFF, ack, TH_ACK | TH_FIN)})
    recs.insert(len(recs) // 3, {"t": "note", "x": 1})
    cut = build_tcp(ip_bytes("10.9.99.1"), SERVER4, 4444, 80, 5, 6, TH_ACK, payload=b"y" * 50)
    recs.insert(len(recs) // 2, {"t": "pkt", "ts": T0 + 1, "data": cut[:60], "len": len(cut)})
    if batch_every:
        recs = [_batched(recs[i:i + batch_every]) if all(
            r["t"] == "pkt" and "len" not in r for r in recs[i:i + batch_every])
            else recs[i:i + batch_every] for i in range(0, len(recs), batch_every)]
        recs = [r for x in recs for r in (x if isinstance(x, list) else [x])]
    return recs


def _batched(recs):
    from tcpcopylib.wire import encode_pkts

    return cbor2.loads(encode_pkts([r["ts"] for r in recs], [r["data"] for r in recs]))


def encoded(recs, second_section_at=None):
    """The stream; with second_section_at, a label and header again before that record."""
    out = encode_section(header("test"))
    for i, r in enumerate(recs):
        if i == second_section_at:
            out += encode_section(header("test2"))
        out += cbor2.dumps(r)
    return out


def session(args, data, stats=None):
    r = tc.call(["tc-session", *TARGETS, "--no-feedback", "--asap", "--drain", "0",
                 *(["--stats-json", stats] if stats else []), *map(str, args)], input=data)
    assert r.returncode == 0, r.stderr
    return r, (json.loads(stats.read_text()) if stats else None)


def per_session(out):
    """{sid: client port} and the sessions as a multiset: each session the sorted list of
    what it sent, with the client port and the checksums left out (each shard moves the
    captured ports into its own -f block; nothing else may differ)."""
    by_sid, ports = collections.defaultdict(list), collections.defaultdict(set)
    for rec in out:
        if rec["t"] != "pkt":
            continue
        t = parse_tcp(rec["data"])
        ports[rec["sid"]].add(t.sport)
        by_sid[rec["sid"]].append((t.src, t.dst, t.dport, t.seq, t.ack, t.flags, t.window,
                                   t.options, t.payload))
    assert all(len(p) == 1 for p in ports.values())  # a session keeps its port
    return ({sid: p.pop() for sid, p in ports.items()},
            collections.Counter(tuple(sorted(v)) for v in by_sid.values()))


def sess_records(out):
    return collections.Counter((tuple(r["orig"]), r["copy"], tuple(r["target"]), r["outcome"])
                               for r in out if r["t"] == "sess")


SAME_COUNTERS = ("pkts_in", "pkts_ignored", "pkts_truncated", "pkts_server", "pkts_out",
                 "bytes_out", "sessions", "syn_sent", "fake_syn", "acks_sent", "outcomes")


@pytest.mark.parametrize("isns", ISNS)
def test_shards_send_what_one_process_sends(tmp_path, isns):
    recs = sessions_stream(300, isns)
    data = encoded(recs, second_section_at=len(recs) * 2 // 3)
    one, st1 = session(["--sessions", "-"], data, tmp_path / "one.json")
    three, st3 = session(["--shards", 3, "--sessions", "-"], data, tmp_path / "three.json")
    out1, out3 = tc.decode(one.stdout, headers=True), tc.decode(three.stdout, headers=True)
    ports1, sessions1 = per_session(out1)
    ports3, sessions3 = per_session(out3)
    assert len(sessions1) > 290 and sessions3 == sessions1
    assert sess_records(out3) == sess_records(out1) and sum(sess_records(out1).values()) == 300
    # one header per input section, in the same place; the note passed through once
    assert [r.get("tool") for r in out3 if r["t"] == "header"] == ["tc-session"] * 2
    assert [r for r in out3 if r["t"] == "note"] == [{"t": "note", "x": 1}]
    # session ids: unique over the shards, the same in the packets and the session map
    sids = {r["sid"] for r in out3 if r["t"] == "sess"}
    assert sids == set(ports3) and len(sids) == 300
    # each shard's client ports in its own -f block (k of 3): never a shared 4-tuple
    block = (PORT_HI - PORT_LO) // 3
    blocks = {sid: (port - PORT_LO) // block for sid, port in ports3.items()}
    assert set(blocks.values()) == {0, 1, 2}
    assert all(blocks[sid] == sid // ((1 << 32) // 3) for sid in sids)  # sid range k <-> block k
    # the counters: summed over the shards, the same as one process's
    for key in SAME_COUNTERS:
        assert st3[key] == st1[key], key
    assert st3["shards"] == 3 and sum(st3["shard_records"]) == sum(
        1 for r in recs if r["t"] == "pkt")
    assert st3["summary"].split(" (")[0] == st1["summary"].split(" (")[0]


def test_shards_same_with_copies_batches_and_a_user_instance(tmp_path):
    """-n 2 (the copies of a session stay in its shard), batches in (tc-readpcap -B) and
    out (-B 8), -f 1/4 composed with the shards: shard k of 2 uses block 1*2 + k of 8."""
    from tcpcopylib.testing import FIXED_ISNS

    recs = sessions_stream(120, FIXED_ISNS, batch_every=5)
    data = encoded(recs)
    one, st1 = session(["-n", 2, "-f", "1/4", "-B", 8], data, tmp_path / "1.json")
    two, st2 = session(["-n", 2, "-f", "1/4", "-B", 8, "--shards", 2], data,
                       tmp_path / "2.json")
    assert b"\x64pkts" in two.stdout
    ports1, s1 = per_session(tc.decode(one.stdout))
    ports2, s2 = per_session(tc.decode(two.stdout))
    assert s2 == s1 and sum(s1.values()) == 2 * 120
    block = (PORT_HI - PORT_LO) // 8
    assert {(p - PORT_LO) // block for p in ports2.values()} == {2, 3}
    assert {(p - PORT_LO) // ((PORT_HI - PORT_LO) // 4) for p in ports1.values()} == {1}
    for key in SAME_COUNTERS:
        assert st2[key] == st1[key], key


def test_shards_offline_path_from_a_pcap(tmp_path):
    """tc-readpcap FILE | tc-session --shards 2, the offline path."""
    from tcpcopylib.testing import FIXED_ISNS

    recs = [r for r in sessions_stream(90, FIXED_ISNS, v6_every=0) if r["t"] == "pkt"
            and "len" not in r]
    cap = tmp_path / "cap.pcap"
    cap.write_bytes(pcap([(r["ts"], r["data"]) for r in recs], linktype=101))
    args = [*TARGETS, "--no-feedback", "--asap", "--drain", "0"]
    one = tc.chain(["tc-readpcap", cap], ["tc-session", *args])
    two = tc.chain(["tc-readpcap", cap], ["tc-session", *args, "--shards", 2])
    assert one.returncode == two.returncode == 0, two.stderr
    assert per_session(tc.decode(two.stdout))[1] == per_session(tc.decode(one.stdout))[1]
    # and tc-pace takes the shards' stream as it is: the same records, none held back
    paced = tc.call(["tc-pace", "--stats-json", tmp_path / "pace.json"], input=two.stdout)
    assert paced.returncode == 0, paced.stderr
    assert [x["data"] for x in tc.decode(paced.stdout)] == [
        x["data"] for x in tc.decode(two.stdout)]


def test_shards_sessions_file_holds_every_session(tmp_path):
    from tcpcopylib.testing import FIXED_ISNS

    data = encoded(sessions_stream(60, FIXED_ISNS))
    f = tmp_path / "map.cbor"
    f.write_bytes(b"old contents")
    r, _ = session(["--shards", 2, "--sessions", f], data)
    recs = tc.decode(f.read_bytes(), headers=True)
    assert sum(1 for x in recs if x["t"] == "header") == 2  # a section per shard
    sess = [x for x in recs if x["t"] == "sess"]
    assert len(sess) == 60 and len({x["sid"] for x in sess}) == 60
    assert {x["sid"] for x in sess} == {x["sid"] for x in tc.decode(r.stdout)
                                        if x["t"] == "pkt"}


# -- options, exit codes ----------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--shards", "0"], "--shards takes a number of processes in 1..64"),
    (["--shards", "65"], "--shards takes a number of processes in 1..64"),
    (["--shards", "2", "--socket"], "--shards goes with forged mode"),
    (["--shards", "4", "-f", "1/128"], "more than 256"),
    (["--shards", "2", "-t", "0"], "--timeout must be positive"),
])
def test_shards_usage_errors_exit_2(args, message):
    r = tc.call(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", *args],
                input=tc.stream([]))
    assert r.returncode == 2 and message in r.stderr.decode(), r.stderr


def test_shards_feedback_unreachable_exits_69_naming_the_shard(tmp_path):
    r = tc.call(["tc-session", "--target", "10.0.0.1:80", "--shards", "2", "--feedback",
                 f"unix:{tmp_path}/none.sock"], input=tc.stream([]))
    assert r.returncode == 69, r.stderr
    err = r.stderr.decode()
    # each shard connects itself: the first that fails stops the others, and says so
    assert re.search(r"^tc-session: shard [01]: error: cannot connect to tc-feedback", err,
                     re.M), err
    assert re.search(r"^tc-session: error: shard [01] of 2 failed \(exit status 69\)$", err,
                     re.M), err


def test_shards_send_without_cap_net_raw_exits_77():
    """Each shard opens its own raw socket: without CAP_NET_RAW the first to fail says so
    and the whole exits 77."""
    import shutil

    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("setpriv (util-linux) not installed")
        prefix = ["setpriv", "--inh-caps=-net_raw", "--bounding-set=-net_raw"]
    r = subprocess.run([*prefix, tool_path("tc-session"), "--target", "10.2.0.5:80",
                        "--no-feedback", "--send", "--shards", "2"], input=tc.stream([syn(0, 0)]),
                       capture_output=True, env=tool_env(), timeout=60)
    assert r.returncode == 77, r.stderr
    assert re.search(rb"^tc-session: error: shard [01] of 2 failed \(exit status 77\)$",
                     r.stderr, re.M), r.stderr


def test_shards_bad_and_empty_input():
    r = tc.call(["tc-session", "--target", "10.0.0.1:80", "--no-feedback", "--shards", "2"],
                input=b"not a stream")
    assert r.returncode == 65 and b"not a tcpcopy record stream" in r.stderr
    r = tc.call(["tc-session", "--target", "10.0.0.1:80", "--no-feedback", "--shards", "2",
                 "--stats-json", "/dev/null"], input=tc.stream([]))
    assert r.returncode == 0, r.stderr
    assert [x["t"] for x in tc.decode(r.stdout, headers=True)] == ["header"]


# -- as processes: timing, signals, SIGPIPE, no child left behind ----------------------------

def syn(i, ms):
    c = ip_bytes(f"10.9.0.{i + 1}")
    return {"t": "pkt", "ts": T0 + ms * MS,
            "data": build_tcp(c, SERVER4, 5000 + i, 80, 1000 + i, 0, TH_SYN, options=MSS)}


def shards_of(recs, n):
    return [session_shard(r["data"], n) for r in recs]


def test_shards_keep_the_recorded_pace_from_one_anchor():
    """SYNs 300 ms apart in both shards: each leaves 300 ms after the one before (a shard
    whose first packet comes later does not start its clock there); then a 20 s gap that
    --max-gap 0.3 shortens (each shard alone would see no such gap between its own)."""
    recs = [syn(i, 300 * i) for i in range(6)] + [syn(6 + i, 20_000 + 300 * i)
                                                  for i in range(2)]
    assert len(set(shards_of(recs, 2))) == 2
    t = time.monotonic()
    r = tc.run(["tc-session", "--target", "10.2.0.5:80", "--no-feedback", "--drain", "0",
                "--connect-timeout", "5", "--shards", "2", "--max-gap", "0.3"],
               input=tc.stream(recs), timeout=30)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t < 10  # the 20 s gap was cut
    first = {}  # each session's first SYN (later ones are retransmissions)
    for x in tc.decode(r.stdout):
        if parse_tcp(x["data"]).flags == TH_SYN:
            first.setdefault(x["sid"], x["ts"])
    syns = sorted(first.values())
    assert len(syns) == 8
    gaps = [(b - a) / MS for a, b in zip(syns, syns[1:])]
    assert all(abs(g - 300) < SLACK_MS for g in gaps), gaps


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def start(args, **kw):
    return subprocess.Popen([tool_path("tc-session"), "--target", "10.2.0.5:80",
                             "--no-feedback", "--shards", "2", *map(str, args)],
                            stdin=subprocess.PIPE, env=tool_env(), **kw)


def wait_children(p, n=2, timeout=10):
    deadline = time.monotonic() + timeout
    while len(children(p.pid)) < n:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.05)
    return children(p.pid)


def test_shards_sigterm_drains_every_shard(tmp_path):
    stats = tmp_path / "s.json"
    p = start(["--stats-json", stats, "--drain", "0.5", "--connect-timeout", "30"],
              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    recs = [syn(i, 0) for i in range(20)]
    p.stdin.write(tc.stream(recs))
    p.stdin.flush()
    kids = wait_children(p)
    time.sleep(1.5)  # each shard reports its counters every second: then SIGUSR1 shows
    p.send_signal(signal.SIGUSR1)  # the totals of the running shards
    time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=20)
    p.stdin.close()
    assert p.returncode == 0, err
    assert b"tc-session: 20 sessions (20 active, 0 ended" in err, err
    assert not any(alive(k) for k in kids)
    st = json.loads(stats.read_text())
    # every session ended (reset: unfinished, no SYN-ACK): a SYN (maybe sent again), a RST
    assert st["sessions"] == 20 and st["outcomes"]["no_synack"] + st["outcomes"][
        "unfinished"] == 20, st
    sent = collections.defaultdict(list)  # sid -> flags of what it sent
    for x in tc.decode(out):
        sent[x["sid"]].append(parse_tcp(x["data"]).flags)
    assert len(sent) == 20
    assert all(f[0] == TH_SYN and f[-1] & TH_RST for f in sent.values()), sent


def test_shards_downstream_closed_exits_141_and_no_child_survives():
    r, w = os.pipe()
    p = start(["--connect-timeout", "30"], stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    kids = wait_children(p)
    os.close(r)  # downstream gone before anything was written
    p.stdin.write(tc.stream([syn(i, 0) for i in range(40)]))
    p.stdin.flush()
    p.wait(20)
    assert p.returncode in (141, -signal.SIGPIPE), p.stderr.read()
    deadline = time.monotonic() + 5
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(k) for k in kids)


def test_a_shard_that_dies_fails_the_whole_run():
    p = start(["--connect-timeout", "30", "--drain", "0.5"], stdout=subprocess.DEVNULL,
              stderr=subprocess.PIPE)
    p.stdin.write(tc.stream([syn(i, 0) for i in range(10)]))
    p.stdin.flush()
    kids = wait_children(p)
    os.kill(kids[1], signal.SIGKILL)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 128 + signal.SIGKILL, err
    assert b"tc-session: shard 1 failed (exit status 137); stopping the other shards" in err
    assert err.endswith(b"tc-session: error: shard 1 of 2 failed (exit status 137)\n"), err
    assert not alive(kids[0])


def test_shards_never_outlive_a_killed_parent():
    p = start(["--connect-timeout", "30"], stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    kids = wait_children(p)
    p.kill()  # no chance to pass anything on
    p.wait(10)
    deadline = time.monotonic() + 5
    while any(alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(k) for k in kids)
    p.stdin.close()


# -- the lab: a real target, both forms ------------------------------------------------------

@pytest.mark.netns
@pytest.mark.parametrize("send", [False, True], ids=["pipe", "send"])
def test_shards_replay_every_stream_to_a_real_target(lab, tmp_path, send):
    rec = h.record(lab, tmp_path / "rec", "many", "--conns", 300, "--requests", 2,
                   "--parallel", 10)
    assert rec.client["conns"] == 300 and rec.client["n_errors"] == 0, rec.client
    rep = h.replay(lab, rec.pcap, tmp_path / "replay", session_args=["--shards", 2],
                   timeout=120, send=send)
    assert not rep.timed_out, rep.diagnostics()
    assert rep.rc("tc-session") == 0, rep.diagnostics()
    # the ports moved into each shard's -f block: matched by content
    res = h.compare_streams(rec.streams(), rep.logged(), allow_remap=True)
    assert res.ok and res.identical == 300, f"{res.describe()}\n{rep.diagnostics()}"
    st = rep.stats
    assert st["shards"] == 2 and min(st["shard_records"]) > 0, st
    assert st["sessions"] == 300 and st["outcomes"]["completed"] == 300, st
    if send:
        assert st["emit"]["sent"] == st["pkts_out"] > 0 and st["emit"]["failed"] == 0, st
