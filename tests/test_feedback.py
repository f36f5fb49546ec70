"""tc-feedback + FeedbackClient: routing replies to the clients that claimed them (no root)."""

import os
import socket
import subprocess
import threading
import time

import cbor2
import pytest

import tc
from tcpcopylib.errors import PeerVersionError, UnavailableError
from tcpcopylib.feedback import FeedbackClient, PeerStreamParser, parse_address, reply_key
from tcpcopylib.packet import build_tcp, ip_bytes
from tcpcopylib.records import encode_section

T4 = ip_bytes("10.0.0.5")
C4 = ip_bytes("10.9.0.1")
T6 = ip_bytes("2001:db8::5")
C6 = ip_bytes("2001:db8:9::1")


def fb(cport, client=C4, target=T4, tport=8080, seq=1):
    d = build_tcp(target, client, tport, cport, seq, 2, 0x12)
    return {"t": "fb", "ts": time.time_ns(), "data": d, "len": len(d)}


class Server:
    """tc-feedback on a Unix socket in tmp_path, fed through a pipe we hold open."""

    def __init__(self, tmp_path, *opts):
        self.path = str(tmp_path / "fb.sock")
        self.addr = "unix:" + self.path
        self.p = subprocess.Popen(
            [tc.tool_path("tc-feedback"), "--listen", self.addr, "--stats", "-v", *opts],
            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=tc.tool_env())
        self.p.stdin.write(encode_section({"t": "header", "v": 1, "tool": "test"}))
        self.p.stdin.flush()
        self.clients = []

    def client(self, name="test", key=None):
        deadline = time.monotonic() + 10
        while True:
            c = FeedbackClient(self.addr, name=name, key=key)
            try:
                c.connect(timeout=5)
                self.clients.append(c)
                return c
            except UnavailableError:
                if time.monotonic() > deadline or self.p.poll() is not None:
                    raise
                time.sleep(0.02)

    def send(self, *recs):
        self.p.stdin.write(b"".join(cbor2.dumps(r) for r in recs))
        self.p.stdin.flush()

    def finish(self, timeout=15):
        for c in self.clients:
            c.close()
        self.p.stdin.close()
        rc = self.p.wait(timeout)
        err = self.p.stderr.read().decode()
        return rc, err

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def server(tmp_path):
    made = []

    def start(*opts):
        s = Server(tmp_path, *opts)
        made.append(s)
        return s

    yield start
    for s in made:
        s.kill()


def collect(c, n, timeout=3.0):
    """Read until n fb records arrived or timeout; returns the client ports seen."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        import select

        select.select([c], [], [], 0.05)
        got += c.read_available()
    return got


def stats(err):
    """The --stats line as {label: number}."""
    import re

    line = [ln for ln in err.splitlines() if "replies in" in ln][-1]
    out = {}
    for num, label in re.findall(r"(\d+) ([a-z][a-z ()]*[a-z)])", line):
        out[label.split(" (")[0] if label.startswith("delivered (") else label] = int(num)
    out["held then delivered"] = int(re.search(r"(\d+) held then", line).group(1))
    return out


def ports(recs):
    return sorted(reply_key(r["data"])[1] for r in recs)


def test_two_clients_each_get_only_their_sessions(server):
    s = server()
    a, b = s.client("A"), s.client("B")
    a.claim(C4, 1000, T4, 8080)
    a.claim(C6, 1002, T6, 8080)
    b.claim(C4, 1001, T4, 8080)
    a.flush()
    b.flush()
    s.send(fb(1000), fb(1001), fb(1002, C6, T6), fb(1000, seq=7), fb(1001, seq=9))
    got_a, got_b = collect(a, 3), collect(b, 2)
    assert ports(got_a) == [1000, 1000, 1002]
    assert ports(got_b) == [1001, 1001]
    assert [r["data"] for r in got_b] == [fb(1001)["data"], fb(1001, seq=9)["data"]]
    time.sleep(0.1)
    assert a.read_available() == [] and b.read_available() == []
    rc, err = s.finish()
    assert rc == 0
    assert "5 replies in, 5 delivered" in err


def test_unclaimed_reply_counted_not_delivered(server):
    s = server("--hold-ms", "100")
    a = s.client()
    a.claim(C4, 1000, T4, 8080)
    a.flush()
    s.send(fb(4444), fb(1000))
    got = collect(a, 1)
    time.sleep(0.3)
    got += a.read_available()
    assert ports(got) == [1000]
    rc, err = s.finish()
    assert rc == 0
    st = stats(err)
    assert (st["replies in"], st["delivered"], st["unclaimed"]) == (2, 1, 1)


def test_reply_before_claim_is_held_then_delivered(server):
    s = server("--hold-ms", "3000")
    a = s.client()
    s.send(fb(1000))
    time.sleep(0.3)  # the reply is in tc-feedback before the claim
    assert a.read_available() == []
    a.claim(C4, 1000, T4, 8080)
    a.flush()
    assert ports(collect(a, 1)) == [1000]
    rc, err = s.finish()
    assert "1 delivered (1 held then delivered), 0 unclaimed" in err


def test_held_reply_expires_as_unclaimed(server):
    s = server("--hold-ms", "100")
    a = s.client()
    s.send(fb(1000))
    time.sleep(0.5)
    a.claim(C4, 1000, T4, 8080)
    a.flush()
    assert collect(a, 1, timeout=0.5) == []
    rc, err = s.finish()
    assert "0 delivered (0 held then delivered), 1 unclaimed" in err


def test_disconnect_frees_entries(server):
    s = server("--hold-ms", "3000")
    a, b = s.client("A"), s.client("B")
    a.claim(C4, 1000, T4, 8080)
    a.flush()
    time.sleep(0.2)
    a.close()
    time.sleep(0.2)
    s.send(fb(1000))  # A's route is gone: held, not sent into A's dead socket
    time.sleep(0.2)
    b.claim(C4, 1000, T4, 8080)
    b.flush()
    assert ports(collect(b, 1)) == [1000]
    rc, err = s.finish()
    assert "1 held then delivered" in err


def test_release_stops_delivery(server):
    s = server("--hold-ms", "300")
    a = s.client()
    a.claim(C4, 1000, T4, 8080)
    a.flush()
    s.send(fb(1000))
    assert len(collect(a, 1)) == 1
    a.release(C4, 1000, T4, 8080)
    a.flush()
    time.sleep(0.2)
    s.send(fb(1000))
    assert collect(a, 1, timeout=0.5) == []
    rc, err = s.finish()
    st = stats(err)
    assert (st["replies in"], st["delivered"], st["unclaimed"]) == (2, 1, 1)


def test_slow_client_drops_are_counted_and_others_unaffected(server):
    s = server("--client-buffer", "16384", "--hold-ms", "0", "--drain-s", "1")
    slow, fast = s.client("slow"), s.client("fast")
    slow.claim(C4, 1000, T4, 8080)
    fast.claim(C4, 1001, T4, 8080)
    slow.flush()
    fast.flush()
    time.sleep(0.2)
    n = 5000  # ~400 KB for the slow client: more than socket buffers + 16 KiB
    for i in range(0, n, 500):
        s.send(*[fb(1000, seq=j) for j in range(i, i + 500)])
    s.send(*[fb(1001, seq=j) for j in range(20)])  # behind the slow client's flood
    got = collect(fast, 20, timeout=10)
    assert [r["data"] for r in got] == [fb(1001, seq=j)["data"] for j in range(20)]
    rc, err = s.finish()
    assert rc == 0
    assert "not reading fast enough" in err
    st = stats(err)
    assert st["dropped (slow client)"] > 0
    assert st["delivered"] + st["dropped (slow client)"] == n + 20


def test_connect_failure_unavailable(tmp_path):
    c = FeedbackClient("unix:" + str(tmp_path / "nobody.sock"))
    with pytest.raises(UnavailableError, match="cannot connect to tc-feedback"):
        c.connect(timeout=1)

    from tcpcopylib.cli.common import Tool

    class Probe(Tool):
        name = "tc-probe"
        writes_records = False

        def run(self, args):
            FeedbackClient("unix:" + str(tmp_path / "nobody.sock")).connect(timeout=1)

    import io

    err = io.StringIO()
    assert Probe(stderr=err).main([]) == 69
    assert "tc-probe: error: cannot connect to tc-feedback" in err.getvalue()


def test_cannot_listen_exit_69(tmp_path):
    r = tc.call(["tc-feedback", "--listen", f"unix:{tmp_path}/no/such/dir/fb.sock"], input=b"")
    assert r.returncode == 69
    assert b"cannot listen" in r.stderr


def test_newer_client_version_refused(server):
    s = server()
    s.client().close()  # wait until it listens
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(s.path)
    raw.sendall(encode_section({"t": "header", "v": 99, "tool": "future"}))
    raw.settimeout(3)
    data = b""
    while True:
        chunk = raw.recv(4096)
        if not chunk:
            break
        data += chunk
    raw.close()
    items = [i for i, _ in PeerStreamParser("t").feed(data)]
    assert items[0]["t"] == "header" and items[0]["v"] == 1
    assert items[-1]["t"] == "error" and items[-1]["error"] == "version"
    assert "version 99" in items[-1]["msg"]
    rc, err = s.finish()
    assert "refusing client" in err and "version 99" in err


def test_client_refuses_newer_server(tmp_path):
    path = str(tmp_path / "fake.sock")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen(1)

    def fake():
        s, _ = ls.accept()
        s.sendall(encode_section({"t": "header", "v": 2, "tool": "tc-feedback"}))
        time.sleep(1)
        s.close()

    t = threading.Thread(target=fake)
    t.start()
    try:
        with pytest.raises(PeerVersionError, match="version 2"):
            FeedbackClient("unix:" + path).connect(timeout=3)
    finally:
        t.join()
        ls.close()


def test_tcp_address_and_server_exit_seen_by_client(server, tmp_path):
    # The port stays ours: a bound socket (SO_REUSEADDR, never listening) is held to the end;
    # tc-feedback (SO_REUSEADDR) binds it too, while no one else gets it as an ephemeral port.
    probe = socket.socket()
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    p = subprocess.Popen([tc.tool_path("tc-feedback"), "--listen", f"tcp:127.0.0.1:{port}"],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=tc.tool_env())
    try:
        p.stdin.write(tc.stream([]))
        p.stdin.flush()
        c = None
        for _ in range(200):
            try:
                c = FeedbackClient(f"tcp:127.0.0.1:{port}")
                c.connect(timeout=2)
                break
            except UnavailableError:
                c = None
                time.sleep(0.02)
        assert c is not None
        c.claim(C4, 1000, T4, 8080)
        c.flush()
        time.sleep(0.1)
        p.stdin.write(cbor2.dumps(fb(1000)))
        p.stdin.close()
        assert ports(collect(c, 1)) == [1000]
        assert p.wait(10) == 0
        with pytest.raises(UnavailableError, match="closed"):
            for _ in range(100):
                c.read_available()
                time.sleep(0.02)
        c.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        probe.close()


def test_parse_address():
    assert parse_address("unix:/x/y") == (socket.AF_UNIX, "/x/y")
    assert parse_address("tcp:127.0.0.1:5") == (socket.AF_INET, ("127.0.0.1", 5))
    assert parse_address("tcp:[::1]:5")[0] == socket.AF_INET6
    assert parse_address("tcp::36524", listen=True)[1][1] == 36524
    from tcpcopylib.errors import UsageError

    for bad in ("tcp:host", "udp:1.2.3.4:5", "unix:", "tcp:1.2.3.4:0"):
        with pytest.raises(UsageError):
            parse_address(bad)


def test_decoder_split_anywhere():
    data = tc.stream([fb(1000), fb(1001)]) + tc.stream([fb(1002)])
    for cut in range(1, len(data)):
        d = PeerStreamParser("t")
        items = d.feed(data[:cut]) + d.feed(data[cut:])
        assert [i["t"] for i, _ in items] == ["header", "fb", "fb", "header", "fb"]
        assert cbor2.loads(items[2][1]) == items[2][0]


def test_hold_is_bounded(server):
    s = server("--hold-max", "2", "--hold-ms", "5000")
    a = s.client()
    s.send(fb(1000), fb(1001), fb(1002))  # the oldest held reply is pushed out
    time.sleep(0.3)
    for port in (1000, 1001, 1002):
        a.claim(C4, port, T4, 8080)
    a.flush()
    assert ports(collect(a, 2)) == [1001, 1002]
    assert collect(a, 1, timeout=0.3) == []
    rc, err = s.finish()
    st = stats(err)
    assert (st["delivered"], st["unclaimed"]) == (2, 1)


def test_file_input_and_sigterm(tmp_path):
    """A regular file as input; SIGTERM stops a server cleanly (exit 0, socket removed)."""
    import signal

    f = tmp_path / "in.cbor"
    f.write_bytes(tc.stream([fb(1000)]))
    sock = tmp_path / "s.sock"
    r = tc.call(["tc-feedback", "--listen", f"unix:{sock}", "--stats", "--hold-ms", "50", f])
    assert r.returncode == 0, r.stderr
    assert b"1 replies in, 0 delivered" in r.stderr and b"1 unclaimed" in r.stderr
    p = subprocess.Popen([tc.tool_path("tc-feedback"), "--listen", f"unix:{sock}"],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=tc.tool_env())
    try:
        for _ in range(250):
            if sock.exists():
                break
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert not sock.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _client_on(sock):
    """A FeedbackClient on one end of a socketpair; the test writes the server side."""
    c = FeedbackClient("unix:/nonexistent")
    sock.setblocking(False)
    c.sock = sock
    return c


def test_read_replies_equals_read_available_in_any_split():
    """The fast (data, len) path gives what the dict path gives, however the stream is cut,
    with usual-shape records (tc-intercept's layout) and others mixed."""
    import random

    recs = [fb(1000 + i, seq=i) for i in range(40)]
    recs[3]["len"] = 70000                                   # 4-byte len
    recs[7] = {"t": "fb", "data": recs[7]["data"], "ts": 5, "len": 40}  # other key order
    recs[11]["data"] = recs[11]["data"][:20]                 # short data
    recs[15] = {"t": "stats", "n": 1}                        # not fb: skipped
    recs[19]["len"] = 100                                    # 1-byte len
    for r in recs[20:30]:
        r["len"] = 1500                                      # 2-byte len
    stream = encode_section({"t": "header", "v": 1, "tool": "t"}) + b"".join(
        cbor2.dumps(r) for r in recs)
    want = [(r["data"], r["len"]) for r in recs if r["t"] == "fb"]
    rnd = random.Random(3)
    for trial in range(30):
        cuts = sorted(rnd.sample(range(1, len(stream)), rnd.randrange(1, 40)))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
        outs = []
        for method in ("read_replies", "read_available"):
            a, b = socket.socketpair()
            c = _client_on(a)
            got = []
            for piece in pieces:
                b.sendall(piece)
                time.sleep(0.0005 if trial < 3 else 0)
                got += getattr(c, method)()
            for _ in range(100):
                if len(got) >= len(want):
                    break
                time.sleep(0.002)
                got += getattr(c, method)()
            if method == "read_available":
                got = [(r["data"], r["len"]) for r in got]
            outs.append(got)
            c.close()
            b.close()
        assert outs[0] == outs[1] == want, trial


def test_router_inline_path_equals_per_record_model():
    """tc-feedback's inline routing (runs of records appended per client at once) delivers
    what routing record by record would: order, per-client caps, unclaimed, held, IPv6,
    IPv4 options, records of other shapes; however the input is cut."""
    import random

    from tcpcopylib.feedback import FeedbackServer, _Client, _ip_text
    from tcpcopylib.intercept import encode_fb

    rnd = random.Random(5)
    keys = [(C4, 1000 + i, T4, 8080) for i in range(6)] + [(C6, 2000 + i, T6, 8080)
                                                             for i in range(3)]
    owner = {k: ("a" if i % 3 else "b") for i, k in enumerate(keys[:-2])}  # 2 unclaimed
    raws = []
    for i in range(400):
        cip, cport, tip, tport = k = keys[rnd.randrange(len(keys))]
        d = build_tcp(tip, cip, tport, cport, i, 2, 0x10, payload=b"p" * rnd.randrange(0, 30))
        if k[0] == C4 and i % 17 == 0:  # IPv4 with 4 bytes of options (NOP x4)
            d = bytes([0x46]) + d[1:20] + b"\x01" * 4 + d[20:]
        if i % 13 == 0:
            raws.append(cbor2.dumps({"t": "fb", "ts": i, "data": d, "len": len(d)}))
        else:
            raws.append(encode_fb(1_800_000_000_000_000_000 + i, d, len(d)))
        if i % 50 == 7:
            raws.append(cbor2.dumps({"t": "stats", "n": i}))  # passed over
    cap = 6000
    want = {"a": b"", "b": b""}
    drops = unclaimed = 0
    for raw in raws:
        rec = cbor2.loads(raw)
        if rec["t"] != "fb":
            continue
        who = owner.get(reply_key(rec["data"]))
        if who is None:
            unclaimed += 1
        elif len(want[who]) + len(raw) > cap:
            drops += 1
        else:
            want[who] += raw
    assert drops and unclaimed and want["a"] and want["b"]
    stream = encode_section({"t": "header", "v": 1, "tool": "t"}) + b"".join(raws)
    for trial in range(10):
        srv = FeedbackServer("unix:/nonexistent", hold_ms=0 if trial % 2 else 60_000,
                             client_buffer=cap, warn=lambda msg: None)
        clients = {"a": _Client(None, "a"), "b": _Client(None, "b")}
        for k, who in owner.items():
            srv.claim(clients[who], [[_ip_text(k[0]), k[1], _ip_text(k[2]), k[3]]], True)
        dec = PeerStreamParser("t")
        cuts = sorted(rnd.sample(range(1, len(stream)), rnd.randrange(1, 60)))
        for a, b in zip([0, *cuts], [*cuts, len(stream)]):
            srv._serve_input(dec, stream[a:b])
        assert not dec.pending_bytes
        assert bytes(clients["a"].out) == want["a"], trial
        assert bytes(clients["b"].out) == want["b"], trial
        k = srv.counts
        n_fb = sum(1 for r in raws if cbor2.loads(r)["t"] == "fb")
        assert k["replies"] == n_fb and k["dropped_slow"] == drops
        assert k["delivered"] == n_fb - drops - unclaimed
        assert clients["a"].delivered + clients["b"].delivered == k["delivered"]
        assert (k["unclaimed"] if trial % 2 else k["held"]) == unclaimed


def test_claim_records_are_cbor2_encoding():
    """FeedbackClient's hand-encoded claim records equal cbor2's, one per run of a kind."""
    a, b = socket.socketpair()
    c = _client_on(a)
    ops = [("add", C4, 80, T4, 8080), ("add", C4, 23, T4, 24), ("del", C6, 255, T6, 256),
           ("add", C6, 65535, T4, 0), ("add", C4, 1000, T6, 443)]
    ops += [("del", C4, 30000 + i, T4, 8080) for i in range(30)]  # 1-byte array head
    for kind, cip, cport, tip, tport in ops:
        (c.claim if kind == "add" else c.release)(cip, cport, tip, tport)
    c.flush()
    c.flush()  # nothing more
    want, runs = b"", []
    for kind, cip, cport, tip, tport in ops:
        e = [socket.inet_ntop(socket.AF_INET if len(cip) == 4 else socket.AF_INET6, cip), cport,
             socket.inet_ntop(socket.AF_INET if len(tip) == 4 else socket.AF_INET6, tip), tport]
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(e)
        else:
            runs.append((kind, [e]))
    want = b"".join(cbor2.dumps({"t": "claim", kind: es}) for kind, es in runs)
    b.settimeout(2)
    got = b""
    while len(got) < len(want):
        got += b.recv(1 << 16)
    assert got == want
    c.close()
    b.close()


def test_claim_records_read_inline_as_decoded():
    """tc-feedback's inline claim reader gives the keys the decoded record gives, and
    leaves anything else (malformed, other layouts, incomplete) to the decoder."""
    from tcpcopylib.feedback import claim_keys, claim_route_key

    for entries in ([["10.0.0.1", 80, "10.0.0.5", 8080]], [["2001:db8::1", 65535, "10.0.0.5", 0]] * 30,
                    [], [["ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", 24, "::1", 255]] * 300):
        for kind in ("add", "del"):
            enc = cbor2.dumps({"t": "claim", kind: entries})
            assert claim_keys(b"xy" + enc, 2) == (kind == "add", [claim_route_key(e) for e in entries],
                                                  len(enc) + 2)
            for cut in range(0, len(enc), 7):
                assert claim_keys(enc[:cut], 0) is None
    for bad in ({"t": "claim", "add": [["x", 1, "10.0.0.1", 2]]},
                {"t": "claim", "add": [["10.0.0.1", 1, "10.0.0.1", 70000]]},
                {"t": "claim", "add": [["10.0.0.1", 1, "10.0.0.1"]]},
                {"t": "claim", "add": None}, {"t": "claim", "add": [], "del": []},
                {"t": "claim", "del": [["10.0.0.1", -1, "10.0.0.1", 3]]}):
        assert claim_keys(cbor2.dumps(bad), 0) is None, bad


@pytest.mark.parametrize("keyed", [False, True], ids=["nokey", "key"])
def test_client_reconnects_and_claims_again(server, tmp_path, keyed):
    """FeedbackClient.reconnect(): a restarted tc-feedback gets every live claim again (and
    none released), after the key check if there is a key; the replies of the live
    sessions flow again."""
    opts = ()
    if keyed:
        (tmp_path / "key").write_bytes(b"0123456789abcdef0123\n")
        opts = ("--key", str(tmp_path / "key"))
    srv = server(*opts)
    c = srv.client(key=b"0123456789abcdef0123" if keyed else None)
    for port in (41000, 41001, 41002):
        c.claim(C4, port, T4, 8080)
    c.release(C4, 41001, T4, 8080)
    c.flush()
    srv.send(fb(41000))
    assert ports(collect(c, 1)) == [41000]
    srv.kill()
    with pytest.raises(UnavailableError):
        for _ in range(100):
            c.read_replies()
            time.sleep(0.01)
    srv2 = server(*opts)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert c.reconnect() == 2
            break
        except UnavailableError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    srv2.send(fb(41000), fb(41001), fb(41002))
    assert sorted(ports(collect(c, 2))) == [41000, 41002]
    assert c.reconnects == 1
    c.close()
    rc, err = srv2.finish()
    assert rc == 0 and "1 unclaimed" in err, err


@pytest.mark.netns
def test_tc_feedback_restarted_mid_replay(lab, tmp_path):
    """The lab: tc-intercept | tc-feedback killed (SIGKILL) and started again in the middle
    of a replay; tc-session reconnects, claims its live sessions again, and every session
    completes, byte for byte."""
    import json
    import signal

    import replay_harness as h

    rec = h.record(lab, tmp_path / "rec", "close", "--conns", 12, "--gap", 0.4)
    n = rec.client["conns"]
    assert rec.client["n_errors"] == 0 and n == 12, rec.client
    work = tmp_path / "replay"
    work.mkdir()
    logs = work / "target"
    stats_json = work / "session-stats.json"
    srv = h.start_recording_server(lab, "target", logs, h.PORT, delay=0.2)
    procs, old = {}, []
    try:
        fbprocs, addr = h.start_feedback(lab, work, h.PORT)
        procs.update(fbprocs)
        chain = [("tc-readpcap", [str(rec.pcap)]),
                 ("tc-session", ["--target", f"{lab.target_ip}:{h.PORT}", "--feedback", addr,
                                 "--drain", "30", "--stats-json", str(stats_json)]),
                 ("tc-pace", []), ("tc-emit", [])]
        prev = None
        for i, (name, args) in enumerate(chain):
            p = h.Proc(lab, "online", [h.tool(name), "--stats", *args],
                       stdin=prev.p.stdout if prev else subprocess.DEVNULL,
                       stdout=None if i == len(chain) - 1 else subprocess.PIPE,
                       env=h.tool_env(), name=name)
            if prev:
                prev.p.stdout.close()
            procs[name] = prev = p
        time.sleep(2.5)  # some sessions done, some running, most to come
        assert procs["tc-emit"].p.poll() is None, "the replay ended before the restart"
        old = [procs.pop("tc-feedback"), procs.pop("tc-intercept")]
        old[0].stop(signal.SIGKILL)
        old[1].stop()
        time.sleep(0.5)
        fbprocs, addr2 = h.start_feedback(lab, work, h.PORT)
        assert addr2 == addr
        procs.update(fbprocs)
        assert procs["tc-emit"].wait(90) is not None, "the replay did not finish"
        h.wait_settled(logs)
    finally:
        for name in ("tc-readpcap", "tc-session", "tc-pace", "tc-emit", "tc-intercept",
                     "tc-feedback"):
            if name in procs:
                procs[name].stop()
        lab.stop(srv)
    diag = "\n".join(repr(p) for p in [*procs.values(), *old])
    assert procs["tc-session"].p.returncode == 0, diag
    stats = json.loads(stats_json.read_text())
    assert stats["feedback_reconnects"] >= 1, stats
    assert "reconnected to tc-feedback" in procs["tc-session"].stderr, diag
    res = h.compare_streams(rec.streams(), h.logged_streams(logs))
    assert res.ok and res.identical == n, f"{res.describe()}\n{stats}\n{diag}"
    assert stats["outcomes"].get("completed", 0) + stats["outcomes"].get("reconnected", 0) \
        == n, stats
    if os.environ.get("TC_SHOW"):
        print(diag, stats)


def test_client_input_split_anywhere_gives_the_same_claims():
    """tc-feedback's reading of a client (inline claims, framing, a budget per turn) claims
    the same connections however the client's stream is cut, down to single bytes."""
    import random

    from tcpcopylib.feedback import FeedbackServer, _Client, claim_route_key

    rnd = random.Random(7)
    entries = [[f"10.9.{i // 200}.{i % 200 + 1}", 1024 + i, "10.0.0.5", 8080] for i in range(1500)]
    recs = [{"t": "claim", "add": entries[:700]}, {"t": "stats", "n": 1},
            {"t": "claim", "del": entries[:10]}, {"t": "claim", "add": entries[700:],
                                                  "del": entries[10:20]},
            {"t": "claim", "add": [["2001:db8::1", 80, "2001:db8::5", 8080]]}]
    stream = encode_section({"t": "header", "v": 1, "tool": "t"}) + b"".join(
        cbor2.dumps(r) for r in recs)
    want = {claim_route_key(e) for e in entries[20:]} | {
        claim_route_key(["2001:db8::1", 80, "2001:db8::5", 8080])}
    for trial in range(12):
        srv = FeedbackServer("unix:/nonexistent", warn=lambda msg: None)
        a, b = socket.socketpair()
        c = _Client(a, "t")
        c.state = 0  # (expects the label, as accepted)
        srv.clients[a.fileno()] = c
        if trial < 2:
            cuts = list(range(1, len(stream))) if trial == 0 else []
        else:
            cuts = sorted(rnd.sample(range(1, len(stream)), rnd.randrange(1, 200)))
        for lo, hi in zip([0, *cuts], [*cuts, len(stream)]):
            while c in srv._backlog:
                srv._serve_backlog()
            srv._client_input(c, stream[lo:hi])
        while srv._backlog:
            srv._serve_backlog()
        assert c.sock is not None and not c.inbuf and srv.input_bytes == 0, trial
        assert set(srv.routes) == want and c.keys == want, trial
        a.close()
        b.close()
