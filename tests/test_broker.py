"""tc-publish and tc-subscribe through a real nats-server on loopback (JetStream, a token),
and the broker library's parts alone: the partition of a packet, the messages of a chunk,
the subscriber's duplicate and gap accounting, times and durations, the credentials rule.

The fleet in network namespaces (a three-node cluster, online and replay hosts) is in
test_broker_lab.py.
"""

import json
import signal
import subprocess
import time

import pytest

import capfiles as cf
import natskit
from tc import REPO, decode, run, stream, tool_env, tool_path
from tcpcopylib import broker
from tcpcopylib.errors import UsageError
from tcpcopylib.packet import TH_ACK, TH_PSH, TH_SYN, build_tcp, parse_tcp_fast

PCAP = REPO / "examples" / "http-lab.pcap"


# -- the partition of a packet -------------------------------------------------------------

def _conn_packets(src, dst, sport, dport):
    """A few packets of one connection, both directions."""
    return [build_tcp(src, dst, sport, dport, 1000, 0, TH_SYN),
            build_tcp(dst, src, dport, sport, 5000, 1001, TH_SYN | TH_ACK),
            build_tcp(src, dst, sport, dport, 1001, 5001, TH_ACK | TH_PSH, payload=b"GET /"),
            build_tcp(dst, src, dport, sport, 5001, 1006, TH_ACK, payload=b"HTTP/1.1 200")]


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_a_connection_is_in_one_partition_whatever_the_direction(family):
    src, dst = (cf.A4, cf.B4) if family == "v4" else (cf.A6, cf.B6)
    seen = {}
    for sport in range(20000, 20400):
        parts = {broker.partition_of(p, 7) for p in _conn_packets(src, dst, sport, 80)}
        assert len(parts) == 1, (sport, parts)
        k = parts.pop()
        assert 0 <= k < 7
        seen[k] = seen.get(k, 0) + 1
    # 400 connections over 7 partitions: every partition gets some (a hash, not a constant)
    assert len(seen) == 7 and min(seen.values()) > 20, seen


def test_the_partition_is_the_same_on_every_host_and_run():
    # CRC-32 of the ordered ends: a value fixed here, so that two hosts (or versions)
    # never disagree on the owner of a connection
    p = build_tcp(cf.A4, cf.B4, 40000, 80, 1, 0, TH_SYN)
    key = broker.session_endpoints(p)
    assert key == cf.A4 + (40000).to_bytes(2, "big") + cf.B4 + (80).to_bytes(2, "big")
    import zlib

    assert broker.partition_of(p, 1000) == zlib.crc32(key) % 1000
    assert broker.partition_of(b"", 5) == broker.partition_of(b"\x00junk", 5) == 0


def test_partitioner_messages_keep_each_partition_in_order():
    conns = [_conn_packets(cf.A4, cf.B4, 30000 + i, 80) for i in range(40)]
    # interleave the connections' packets, as a capture sees them
    items, ts = [], cf.TS0
    for j in range(4):
        for c in conns:
            ts += 1
            items.append((ts, c[j]))
    items.insert(5, {"t": "stats", "n": 1})  # a record that is no packet: partition 0
    part = broker.Partitioner(3)
    part.add(items)
    msgs = part.messages()
    assert sorted({k for k, _, _ in msgs}) == [0, 1, 2]
    got = []
    for k, payload, count in msgs:
        recs = decode(stream([]) + payload)
        assert len(recs) == count
        for r in recs:
            if r["t"] == "pkt":
                assert broker.partition_of(r["data"], 3) == k
                got.append((r["ts"], r["data"]))
            else:
                assert k == 0 and r == {"t": "stats", "n": 1}
    want = [it for it in items if type(it) is tuple]
    assert sorted(got) == sorted(want)
    # within a partition, the input order
    for k, payload, _ in msgs:
        stamps = [r["ts"] for r in decode(stream([]) + payload) if r["t"] == "pkt"]
        assert stamps == sorted(stamps)


def test_large_chunks_are_split_into_messages_below_the_limit():
    big = [(cf.TS0 + i, build_tcp(cf.A4, cf.B4, 40000, 80, i * 1400, 0, TH_ACK,
                                  payload=bytes(1400))) for i in range(1200)]
    part = broker.Partitioner(2)
    part.add(big)
    msgs = part.messages()
    assert len(msgs) >= 3 and len({k for k, _, _ in msgs}) == 1
    assert all(len(p) <= broker.MAX_MESSAGE + 70000 for _, p, _ in msgs)
    assert sum(c for _, _, c in msgs) == 1200
    stamps = [r["ts"] for _, p, _ in msgs for r in decode(stream([]) + p)]
    assert stamps == [t for t, _ in big]


def test_a_reply_goes_to_the_partition_of_its_client_ports_block():
    # the block of tc-session -f K/M: the allocator's own (ports 1024-65535 in M blocks)
    from tcpcopylib.session.alloc import Allocator, block_of_port

    for m in (1, 3, 7):
        for k in range(m):
            a = Allocator(instance=k, instances=m)
            for port in (a.lo, a.hi - 1):
                assert block_of_port(port, m) == k
                reply = build_tcp(cf.B4, cf.A4, 80, port, 1, 2, TH_ACK)
                assert broker.port_block_of(reply, m) == k
                reply6 = build_tcp(cf.B6, cf.A6, 80, port, 1, 2, TH_ACK)
                assert broker.port_block_of(reply6, m) == k
    assert block_of_port(1023, 3) is None and block_of_port(65535, 5) is None
    # tc-session -f K/3 --shards 4: shard k's block (K*4+k of 12) lies in block K of 3
    # (M x shards divides the 64,512 ports; tc-publish(1) says so)
    for k3 in range(3):
        for shard in range(4):
            a = Allocator(instance=k3 * 4 + shard, instances=12)
            assert block_of_port(a.lo, 3) == block_of_port(a.hi - 1, 3) == k3
    assert broker.port_block_of(build_tcp(cf.B4, cf.A4, 80, 80, 1, 2, TH_ACK), 3) == 0


def _replies(ports, copies=1):
    """fb records (as tc-intercept writes them) of replies to the client ports, in turn."""
    return [{"t": "fb", "ts": cf.TS0 + i, "len": 60 + i % 7,
             "data": build_tcp(cf.B4, cf.A4, 80, port, 5000 + i, 1000, TH_ACK,
                               payload=b"r%d" % i)}
            for i, port in enumerate(p for p in ports for _ in range(copies))]


def test_replies_by_port_block_reach_only_their_block(server, tmp_path):
    """tc-publish --by-port-block 3: each replay host's tc-subscribe -p K/3 gets the fb
    records (unchanged, in order) of the replies to its client port block, and only them."""
    from tcpcopylib.session.alloc import Allocator

    conn = _conn(server, tmp_path)
    blocks = [Allocator(instance=k, instances=3) for k in range(3)]
    ports = [b.lo + j * 97 for j in range(20) for b in blocks]
    recs = _replies(ports, copies=2)
    r = run(["tc-publish", *conn, "--stream", "replies", "--by-port-block", "3"],
            input=stream(recs), timeout=60)
    assert r.returncode == 0, r.stderr
    got = []
    for k, b in enumerate(blocks):
        s = run(["tc-subscribe", *conn, "--stream", "replies", "-p", f"{k}/3", "--all",
                 "--until", "now"], timeout=60)
        assert s.returncode == 0, s.stderr
        out = decode(s.stdout)
        assert len(out) == 40
        assert out == [x for x in recs if b.lo <= parse_tcp_fast(x["data"])[4] < b.hi]
        got += out
    assert len(got) == len(recs)
    # the stream has M partitions: another M is refused before anything is stored
    r = run(["tc-publish", *conn, "--stream", "replies", "--by-port-block", "4"],
            input=stream(recs), timeout=60)
    assert r.returncode == 2 and "3 partitions" in r.stderr.decode(), r.stderr
    r = run(["tc-publish", *conn, "--stream", "x", "--by-port-block", "4", "-P", "3"],
            input=stream(recs), timeout=60)
    assert r.returncode == 2, r.stderr


def test_deduper_drops_redeliveries_and_duplicates_and_measures_gaps():
    st = broker.SubscribeStats()
    d = broker.Deduper(st)

    def take(stream_seq, pub, k, seq):
        missing = d.check(stream_seq, pub, k, seq)
        if missing is not None:
            d.written(stream_seq, pub, k, seq)
        return missing

    assert take(10, "a", 0, 1) == 0
    assert take(11, "a", 1, 1) == 0
    assert take(11, "a", 1, 1) is None      # delivered again
    assert take(9, "a", 0, 1) is None
    assert take(12, "a", 0, 1) is None      # stored twice (past the duplicate window)
    assert take(15, "a", 0, 4) == 2         # 2 and 3 of partition 0 not delivered before it
    assert d.after("a", 0) == (4, 15)
    assert take(13, "a", 0, 2) is None      # ... and 2 delivered after it: too late
    assert take(16, "b", 0, 7) == 0         # a publisher first seen mid-way: no gap
    # another publisher's messages (no headers): by stream sequence
    assert take(20, None, 0, None) == 0 and take(20, None, 0, None) is None
    assert (st.redelivered, st.duplicates) == (4, 1)


def test_times_durations_and_shares():
    assert broker.parse_duration("90") == 90 and broker.parse_duration("2h") == 7200
    assert broker.parse_duration("250ms") == 0.25 and broker.parse_duration("1.5m") == 90
    with pytest.raises(ValueError):
        broker.parse_duration("soon")
    assert broker.parse_time("-10m", now=1000.0) == 400.0
    assert broker.parse_time("now", now=5.0) == 5.0
    assert broker.parse_time("@1700000000.5") == 1700000000.5
    assert broker.parse_time("2023-11-14T22:13:20") == 1700000000.0  # no zone: UTC
    assert broker.parse_time("2023-11-14T23:13:20+01:00") == 1700000000.0
    assert broker.parse_share("2/3") == (2, 3)
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(UsageError):
            broker.parse_share(bad)


@pytest.mark.parametrize("args, message", [
    (["-s", "nats://10.255.255.1:4222"], "no broker credentials"),
    (["-s", "10.255.255.1", "--user", "u"], "--user and --password-file go together"),
    (["--tls-cert", "/nonexistent"], "--tls-cert and --tls-key go together"),
    (["--stream", "a.b"], "--stream"),
], ids=["no-credentials", "half-credentials", "half-tls", "bad-stream"])
def test_bad_connection_options_are_usage_errors_before_connecting(args, message):
    for tool in ("tc-publish", "tc-subscribe"):
        r = run([tool, *args], input=stream([]), timeout=20)
        assert r.returncode == 2, (tool, r)
        err = r.stderr.decode()
        assert message in err and len(err.splitlines()) == 1, (tool, err)


# -- through a real server -----------------------------------------------------------------

@pytest.fixture
def server(tmp_path):
    natskit.nats_server_binary()
    s = natskit.NatsServer(tmp_path, "n0", port=natskit.free_port(),
                           auth={"token": natskit.TOKEN})
    s.start()
    yield s
    s.stop()


def _conn(server, tmp_path):
    return ["-s", server.url, "--token-file", str(natskit.token_file(tmp_path)),
            "--retry-for", "10s"]


def _capture():
    r = run(["tc-readpcap", str(PCAP)])
    assert r.returncode == 0, r.stderr
    return r.stdout


def _pairs(data):
    return [(r["ts"], r["data"]) for r in decode(data) if r["t"] == "pkt"]


def _conn_key(data):
    p = parse_tcp_fast(data)
    src, dst, _ihl, sport, dport = p[:5]
    return frozenset([(src, sport), (dst, dport)])


def test_three_partitions_give_back_every_record_once_each_connection_in_one(server, tmp_path):
    cap = _capture()
    conn = _conn(server, tmp_path)
    r = run(["tc-publish", *conn, "--stream", "rt", "-P", "3", "--stats-json",
             str(tmp_path / "pub.json")], input=cap, timeout=60)
    assert r.returncode == 0, r.stderr
    outs = []
    for k in range(3):
        s = run(["tc-subscribe", *conn, "--stream", "rt", "-p", f"{k}/3", "--all",
                 "--until", "now"], timeout=60)
        assert s.returncode == 0, s.stderr
        hdr = decode(s.stdout, headers=True)[0]
        assert hdr["tool"] == "tc-subscribe" and hdr["partition"] == f"{k}/3"
        outs.append(_pairs(s.stdout))
    want = _pairs(cap)
    got = [p for out in outs for p in out]
    assert sorted(got) == sorted(want) and len(got) == len(want)  # all, none twice
    owners = {}
    for k, out in enumerate(outs):
        assert out, f"partition {k} got nothing"
        for ts, data in out:
            owners.setdefault(_conn_key(data), set()).add(k)
        # timestamps unchanged and each partition in the order read
        order = [p for p in want if p in set(out)]
        assert out == order
    assert all(len(ks) == 1 for ks in owners.values()), owners


def test_credentials_are_checked(server, tmp_path):
    cap = _capture()
    r = run(["tc-publish", "-s", server.url, "--no-auth", "--retry-for", "2s",
             "--stream", "x"], input=cap, timeout=30)
    assert r.returncode == 77, r
    assert "refused the credentials" in r.stderr.decode()
    (tmp_path / "w").mkdir()
    wrong = natskit.token_file(tmp_path / "w", "not-the-token")
    r = run(["tc-subscribe", "-s", server.url, "--token-file", str(wrong), "--retry-for", "2s",
             "--stream", "x"], timeout=30)
    assert r.returncode == 77, r
    # control: the right token gets in
    r = run(["tc-publish", *_conn(server, tmp_path), "--stream", "x"], input=cap, timeout=30)
    assert r.returncode == 0, r.stderr


def test_a_downstream_slower_than_the_ack_wait_gets_every_record_once(server, tmp_path):
    """The subscriber's output pipe is not read for longer than the ack wait (backpressure:
    the first batch's write blocks): every record arrives once, in order."""
    conn = _conn(server, tmp_path)
    # ~1.2 MB of records (more than a pipe holds): the write of the first batch blocks
    recs = [{"t": "pkt", "ts": cf.TS0 + i,
             "data": build_tcp(cf.A4, cf.B4, 30000 + i % 50, 80, i * 1000, 0, TH_ACK,
                               payload=bytes([i % 251]) * 1000)} for i in range(1200)]
    r = run(["tc-publish", *conn, "--stream", "rd", "-P", "1"], input=stream(recs), timeout=60)
    assert r.returncode == 0, r.stderr
    stats = tmp_path / "sub.json"
    p = subprocess.Popen([tool_path("tc-subscribe"), *conn, "--stream", "rd", "--all",
                          "--until", "now", "--ack-wait", "1s", "-b", "4", "-vv",
                          "--stats-json", str(stats)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())
    try:
        time.sleep(2.5)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert _pairs(out) == [(r["ts"], r["data"]) for r in recs]
    st = json.loads(stats.read_text())
    assert st["records"] == 1200 and st["lost"] == 0, st


def _raw_publish(url, subj, messages):
    """Publish (payload, headers) messages with nats-py itself; the PubAcks' duplicate flags."""
    import asyncio

    import nats

    async def go():
        nc = await nats.connect(url, token=natskit.TOKEN)
        try:
            js = nc.jetstream()
            return [bool((await js.publish(subj, p, headers=h)).duplicate) for p, h in messages]
        finally:
            await nc.close()

    return asyncio.run(go())


def test_duplicates_are_stored_once_written_once_and_gaps_counted(server, tmp_path):
    conn = _conn(server, tmp_path)
    # the stream, made by tc-publish (one record)
    first = {"t": "pkt", "ts": cf.TS0, "data": build_tcp(cf.A4, cf.B4, 35000, 80, 1, 0, TH_SYN)}
    assert run(["tc-publish", *conn, "--stream", "dup", "-P", "1"],
               input=stream([first])).returncode == 0
    import cbor2

    def msg(i, msg_id, seq):
        rec = {"t": "pkt", "ts": cf.TS0 + i, "data": build_tcp(cf.A4, cf.B4, 35000 + i, 80,
                                                              1, 0, TH_SYN)}
        return cbor2.dumps(rec), {broker.H_MSG_ID: msg_id, broker.H_PUB: "other",
                                  broker.H_SEQ: str(seq), broker.H_RECORDS: "1"}

    dups = _raw_publish(server.url, broker.subject("dup", 0), [
        msg(1, "other:0:1", 1),
        msg(1, "other:0:1", 1),    # a publish retried: the broker stores it once
        msg(1, "other:0:1b", 1),   # the same message past the duplicate window
        msg(3, "other:0:3", 3),    # message 2 never stored: lost
    ])
    assert dups == [False, True, False, False]
    stats = tmp_path / "sub.json"
    r = run(["tc-subscribe", *conn, "--stream", "dup", "--all", "--until", "now",
             "--stats-json", str(stats)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert [ts - cf.TS0 for ts, _ in _pairs(r.stdout)] == [0, 1, 3]
    st = json.loads(stats.read_text())
    assert (st["duplicates"], st["lost"], st["records"]) == (1, 1, 3), st


def test_a_message_delivered_late_is_read_from_the_stream_in_its_place(server, tmp_path):
    """A fetch whose answer is lost (a broker node killed under it) leaves its messages
    pending: the consumer delivers the later ones first, the lost ones after the ack wait.
    The subscriber reads the missing ones from the stream and writes every message once,
    in its publisher's order (it once wrote the later ones, counted a loss and dropped
    the late one as delivered again: a session cut short in the broker lab)."""
    import asyncio

    import nats

    from tcpcopylib.records import RecordWriter, header

    subj = broker.subject("gap", 0)
    out = tmp_path / "out.tcr"
    st = broker.SubscribeStats()

    def message(i):
        rec = {"t": "pkt", "ts": cf.TS0 + i,
               "data": build_tcp(cf.A4, cf.B4, 35000 + i, 80, 1, 0, TH_SYN)}
        return stream([rec])[len(stream([])):], {
            broker.H_MSG_ID: f"p:0:{i}", broker.H_PUB: "p", broker.H_SEQ: str(i),
            broker.H_RECORDS: "1"}

    async def go():
        nc = await nats.connect(server.url, token=natskit.TOKEN)
        try:
            js = nc.jetstream()
            await broker.ensure_stream(js, "gap", 1, 3600.0, 1)
            cfg = broker.consumer_config([subj], 64, 30.0, None, False)
            sub = await js.pull_subscribe(subj, durable="lossy",
                                          stream=broker.js_stream_name("gap"), config=cfg)
            with open(out, "wb") as f:
                writer = RecordWriter(f.fileno(), header("test"))
                dedup = broker.Deduper(st)

                async def deliver_what_is_stored():
                    await broker.deliver(sub, nc, js, writer, st, 64, time.time(), 5.0,
                                         10.0, asyncio.Event(), print, dedup=dedup)

                await js.publish(subj, *message(1)[:1], headers=message(1)[1])
                await deliver_what_is_stored()  # message 1 written and acknowledged
                for i in range(2, 6):
                    payload, hdr = message(i)
                    await js.publish(subj, payload, headers=hdr)
                # another pull on the consumer takes 2 and 3 and is never heard of again
                thief = await js.pull_subscribe(subj, durable="lossy",
                                                stream=broker.js_stream_name("gap"))
                stolen = await thief.fetch(2, timeout=5)
                assert [m.headers[broker.H_SEQ] for m in stolen] == ["2", "3"]
                await deliver_what_is_stored()  # 4 and 5 come, 2 and 3 in 30 s only
        finally:
            await nc.close()

    asyncio.run(go())
    assert [ts - cf.TS0 for ts, _ in _pairs(out.read_bytes())] == [1, 2, 3, 4, 5]
    assert (st.recovered, st.lost, st.records, st.messages) == (2, 0, 5, 5)


def test_since_and_until_select_by_the_time_stored(server, tmp_path):
    conn = _conn(server, tmp_path)
    first = stream([{"t": "pkt", "ts": cf.TS0 + i, "data": build_tcp(
        cf.A4, cf.B4, 31000 + i, 80, 1, 0, TH_SYN)} for i in range(5)])
    second = stream([{"t": "pkt", "ts": cf.TS0 + 100 + i, "data": build_tcp(
        cf.A4, cf.B4, 32000 + i, 80, 1, 0, TH_SYN)} for i in range(5)])
    assert run(["tc-publish", *conn, "--stream", "t", "-P", "2"], input=first).returncode == 0
    time.sleep(1.2)
    between = time.time()
    time.sleep(1.2)
    assert run(["tc-publish", *conn, "--stream", "t", "-P", "2"], input=second).returncode == 0

    def sub(*args):
        s = run(["tc-subscribe", *conn, "--stream", "t", *args], timeout=60)
        assert s.returncode == 0, s.stderr
        return sorted(ts - cf.TS0 for ts, _ in _pairs(s.stdout))

    assert sub("--all", "--until", f"@{between}") == [0, 1, 2, 3, 4]
    assert sub("--since", f"@{between}", "--until", "now") == [100, 101, 102, 103, 104]
    assert sub("--all", "--until", "now") == [0, 1, 2, 3, 4, 100, 101, 102, 103, 104]


def test_live_subscriber_stops_on_sigterm_and_a_restart_goes_on(server, tmp_path):
    """Live: records published after the start; SIGTERM ends it with 0; the durable consumer
    lets a restarted subscriber go on with what was published meanwhile."""
    conn = _conn(server, tmp_path)

    def publish(base):
        recs = [{"t": "pkt", "ts": cf.TS0 + base + i, "data": build_tcp(
            cf.A4, cf.B4, 33000 + base + i, 80, 1, 0, TH_SYN)} for i in range(3)]
        assert run(["tc-publish", *conn, "--stream", "lv", "-P", "2"],
                   input=stream(recs)).returncode == 0

    publish(0)  # before the subscriber: not live any more

    def start():
        return subprocess.Popen([tool_path("tc-subscribe"), *conn, "--stream", "lv", "-v"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())

    def stop(p):
        time.sleep(1.5)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
        return sorted(ts - cf.TS0 for ts, _ in _pairs(out))

    p = start()
    time.sleep(1.5)
    publish(10)
    assert stop(p) == [10, 11, 12]
    publish(20)  # nobody subscribed
    p = start()
    assert stop(p) == [20, 21, 22]


def test_nkey_authentication(tmp_path):
    natskit.nats_server_binary()
    allowed = natskit.nkey_pair(tmp_path / "user.nk")
    natskit.nkey_pair(tmp_path / "stranger.nk")  # a valid nkey the server does not know
    s = natskit.NatsServer(tmp_path, "nk", port=natskit.free_port(),
                           auth={"nkey": [allowed]}).start()
    try:
        data = stream([{"t": "pkt", "ts": cf.TS0, "data": build_tcp(
            cf.A4, cf.B4, 34500, 80, 1, 0, TH_SYN)}])
        base = ["-s", s.url, "--stream", "nk", "--retry-for", "5s"]
        r = run(["tc-publish", *base, "--nkey", str(tmp_path / "stranger.nk")], input=data,
                timeout=30)
        assert r.returncode == 77, r
        r = run(["tc-publish", *base, "--nkey", str(tmp_path / "user.nk")], input=data,
                timeout=30)
        assert r.returncode == 0, r.stderr
        r = run(["tc-subscribe", *base, "--nkey", str(tmp_path / "user.nk"), "--all",
                 "--until", "now"], timeout=30)
        assert r.returncode == 0 and len(_pairs(r.stdout)) == 1, r.stderr
    finally:
        s.stop()


def test_tls_with_a_self_signed_certificate(tmp_path):
    natskit.nats_server_binary()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    s = natskit.NatsServer(tmp_path, "tls", port=natskit.free_port(),
                           auth={"token": natskit.TOKEN}, tls=(cert, key)).start()
    try:
        tok = str(natskit.token_file(tmp_path))
        data = stream([{"t": "pkt", "ts": cf.TS0, "data": build_tcp(
            cf.A4, cf.B4, 34000, 80, 1, 0, TH_SYN)}])
        base = ["-s", f"tls://127.0.0.1:{s.port}", "--token-file", tok, "--stream", "tls"]
        # without the CA, the self-signed certificate is not trusted
        r = run(["tc-publish", *base, "--retry-for", "1s"], input=data, timeout=30)
        assert r.returncode == 69, r
        r = run(["tc-publish", *base, "--tls-ca", str(cert)], input=data, timeout=30)
        assert r.returncode == 0, r.stderr
        r = run(["tc-subscribe", *base, "--tls-ca", str(cert), "--all", "--until", "now"],
                timeout=30)
        assert r.returncode == 0 and len(_pairs(r.stdout)) == 1, r.stderr
    finally:
        s.stop()


def test_subscriber_waits_for_the_stream_then_gives_up_with_69(server, tmp_path):
    r = run(["tc-subscribe", *_conn(server, tmp_path)[:-2], "--retry-for", "1s",
             "--stream", "never"], timeout=30)
    assert r.returncode == 69 and "no stream never" in r.stderr.decode(), r


def test_garbage_in_is_65_and_nothing_is_stored(server, tmp_path):
    conn = _conn(server, tmp_path)
    r = run(["tc-publish", *conn, "--stream", "g", "-P", "1"], input=b"GET / HTTP/1.1\r\n\r\n")
    assert r.returncode == 65, r
    assert len(r.stderr.decode().splitlines()) == 1, r.stderr
    s = run(["tc-subscribe", *conn, "--stream", "g", "--all", "--until", "now"], timeout=30)
    assert s.returncode == 0 and _pairs(s.stdout) == [], s.stderr


def test_subscriber_whose_reader_goes_away_exits_141(server, tmp_path):
    conn = _conn(server, tmp_path)
    assert run(["tc-publish", *conn, "--stream", "pp"], input=_capture()).returncode == 0
    p = subprocess.Popen([tool_path("tc-subscribe"), *conn, "--stream", "pp", "--all"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tool_env())
    try:
        p.stdout.read(100)
        p.stdout.close()  # downstream gone
        err = p.stderr.read()
        assert p.wait(30) in (141, -signal.SIGPIPE), err
        assert b"Traceback" not in err and b"error" not in err, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
