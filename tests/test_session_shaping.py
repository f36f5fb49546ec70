"""tc-session's workload shaping with the engine's fake clock: -c pools, -n copies, -f
instances, -r/-g sampling, shedding (pool exhaustion, --max-memory); and the CLI checks."""

import json

import pytest
import tc
from seqnums import FIXED, isns  # noqa: F401 (isns: a fixture)

from tcpcopylib.errors import UsageError
from tcpcopylib.packet import TH_ACK, TH_FIN, TH_PSH, TH_SYN, build_tcp, ip_bytes, parse_tcp
from tcpcopylib.session import Config, Engine, Mapper, parse_target
from tcpcopylib.session.alloc import (Allocator, parse_instance, parse_pool, sample_share,
                                      stable_hash)
from tcpcopylib.testing import MSS_OPT as MSS
from tcpcopylib.testing import ONLINE as O
from tcpcopylib.testing import MS, SEC, EngineRig
from tcpcopylib.testing import TARGET as T

CISN, _, SISN = FIXED          # captured client's and online server's ISN


def client_ip(i):
    return ip_bytes(f"10.77.{i // 250}.{i % 250 + 1}")


class Rig(EngineRig):
    """The kit's engine rig with an automatic target (unless auto=False): SYN-ACK for every
    SYN, and for every request an answer "ok" with a FIN (an HTTP server with Connection:
    close); conns: 4-tuple (as sent) -> the bytes the target received. Sequence numbers
    start from isns (tests/seqnums.py): the target's ISN is isns.target."""

    def __init__(self, alloc=None, auto=True, isns=FIXED, **cfg):
        super().__init__(isns, alloc=alloc, **cfg)
        self.auto = auto
        self.conns = {}

    def respond(self, p):
        if not self.auto:
            return []
        tup = (p.src, p.sport, p.dst, p.dport)
        tisn = self.isns.target
        if p.flags & TH_SYN:
            self.conns.setdefault(tup, b"")
            return [build_tcp(T, p.src, 80, p.sport, tisn, p.seq + 1, TH_SYN | TH_ACK, 65535,
                              MSS)]
        if p.payload:
            self.conns[tup] += p.payload
            return [build_tcp(T, p.src, 80, p.sport, tisn + 1, p.seq + len(p.payload),
                              TH_ACK | TH_PSH | TH_FIN, 65535, b"", b"ok")]
        if p.flags & TH_FIN:
            return [build_tcp(T, p.src, 80, p.sport, tisn + 4, p.seq + 1, TH_ACK)]
        return []

    def session(self, cip, sport, payload=b"GET / HTTP/1.1\r\n\r\n", close=True):
        """A whole captured client session: SYN, ACK, request, FIN."""
        cisn, _, sisn = self.isns
        self.client(TH_SYN, cisn, sport=sport, cip=cip)
        self.pump()
        self.client(TH_ACK, cisn + 1, sisn + 1, sport=sport, cip=cip)
        self.client(TH_ACK | TH_PSH, cisn + 1, sisn + 1, payload, sport=sport, cip=cip)
        self.pump()
        if close:
            self.client(TH_ACK | TH_FIN, cisn + 1 + len(payload), sisn + 4, sport=sport, cip=cip)
            self.pump()

    def syns(self):
        return [(p.src, p.sport) for p in self.sent if p.flags & TH_SYN]


# -- option parsing --------------------------------------------------------------------

def test_pool_forms():
    p = parse_pool("10.9.9.x")[4]
    assert p.size == 254 and p.addr(0) == ip_bytes("10.9.9.1") and p.addr(253) == \
        ip_bytes("10.9.9.254")
    p = parse_pool("10.8.0.0/30, 10.8.0.10-10.8.0.12, 10.8.0.11, 192.0.2.7")[4]
    assert [p.addr(i) for i in range(p.size)] == [ip_bytes(a) for a in (
        "10.8.0.1", "10.8.0.2", "10.8.0.10", "10.8.0.11", "10.8.0.12", "192.0.2.7")]
    p = parse_pool("10.8.0.0/24", exclude=[ip_bytes("10.8.0.5")])[4]
    assert p.size == 253 and ip_bytes("10.8.0.5") not in {p.addr(i) for i in range(253)}
    pools = parse_pool("fd00:77::/64,10.0.0.1")
    assert pools[16].size == 1 << 64 and pools[4].size == 1
    assert pools[16].addr(5) == ip_bytes("fd00:77::5")
    for bad in ("10.9.9.0/33", "10.1.1.5-10.1.1.1", "10.0.0.1-::1", "nohost", "", "1.2.3.x.x",
                "10.2.0.5/32"):
        with pytest.raises(UsageError):
            parse_pool(bad, exclude=[T])
    assert parse_instance("3") == (3, 16) and parse_instance("1/2") == (1, 2)
    for bad in ("2/2", "-1", "a", "0/0", "0/1000"):
        with pytest.raises(UsageError):
            parse_instance(bad)


def test_sample_is_a_stable_keyed_hash():
    # pinned: the same share on every run and every host (no Python hash())
    assert stable_hash(ip_bytes("10.0.0.1"), 1234) == stable_hash(ip_bytes("10.0.0.1"), 1234)
    assert sample_share(ip_bytes("10.0.0.1"), 1234) == pytest.approx(
        stable_hash(ip_bytes("10.0.0.1"), 1234) % 1_000_000 / 10_000)
    assert stable_hash(ip_bytes("10.0.0.1"), 1234) == 0x3346B5ECF0196A9F
    shares = [sample_share(client_ip(i), 40000) for i in range(4000)]
    assert 900 < sum(s < 25 for s in shares) < 1100


# -- -c: pools -------------------------------------------------------------------------

def test_pool_of_two_5000_concurrent_same_port_no_collision_and_deterministic():
    def run():
        r = Rig(Allocator(parse_pool("10.99.0.1,10.99.0.2")), auto=False)
        for i in range(5000):
            r.client(TH_SYN, CISN, sport=40000, cip=client_ip(i))
        return r
    r = run()
    syns = r.syns()
    assert len(syns) == 5000 == len(set(syns))
    assert {a for a, _ in syns} == {ip_bytes("10.99.0.1"), ip_bytes("10.99.0.2")}
    assert all(1024 <= p < 65536 or p == 40000 for _, p in syns)
    # claims name the replayed addresses, not the captured ones
    claimed = {t[0] for kind, t in r.log if kind == "claim"}
    assert claimed == {ip_bytes("10.99.0.1"), ip_bytes("10.99.0.2")}
    assert run().syns() == syns


def test_pool_sessions_complete_and_released_pairs_cool_down(isns):
    r = Rig(Allocator(parse_pool("10.99.0.1")), isns=isns)
    r.session(client_ip(0), 40000, b"first")
    assert r.outcomes() == {"completed": 1}
    r.now += 1 * SEC
    r.session(client_ip(1), 40000, b"second")  # another client, same captured port
    assert r.outcomes() == {"completed": 2}
    a, b = r.syns()
    assert a == (ip_bytes("10.99.0.1"), 40000)
    assert b[0] == a[0] and b[1] != 40000  # the pair is still cooling (target TIME_WAIT)
    assert sorted(r.conns.values()) == [b"first", b"second"]
    r.now += 61 * SEC
    r.session(client_ip(2), 40000, b"third")
    assert r.syns()[-1] == a  # cooled down: the captured port again


def test_pool_exhaustion_sheds_with_one_warning_and_recovers():
    alloc = Allocator(parse_pool("10.99.0.1"), instance=0, instances=256)  # 252 ports
    r = Rig(alloc, auto=False)
    for i in range(300):
        r.client(TH_SYN, CISN, sport=40000, cip=client_ip(i))
        r.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"x", sport=40000, cip=client_ip(i))
    assert len(set(r.syns())) == len(r.syns()) == 252
    assert r.outcomes() == {"pool_exhausted": 48}
    assert len(r.warnings) == 1 and "pool" in r.warnings[0]
    assert r.e.active() == 252 == r.e.st.peak_active
    # the shed sessions' later packets start nothing
    r.client(TH_ACK | TH_PSH, CISN + 2, SISN + 1, b"y", sport=40000, cip=client_ip(299))
    assert len(r.syns()) == 252
    r.e.close_all(r.now)
    r.now += 1 * SEC
    r.client(TH_SYN, CISN, sport=40000, cip=client_ip(500))
    assert len(r.syns()) == 253  # pairs free again: early reuse rather than shedding
    assert alloc.early_reuses == 1


def test_pool_ipv6_and_family_of_the_target():
    c6 = ip_bytes("fd00:9::2")
    t6 = ip_bytes("fd00:1::5")
    e_sent = []
    e = Engine(Mapper(parse_target("[fd00:1::5]:80", False)),
               lambda d, sid, now: e_sent.append(parse_tcp(d)), Config(),
               None, Allocator(parse_pool("fd00:99::/120")))
    for port in (5000, 5001):
        e.client_packet(build_tcp(c6, ip_bytes("fd00:1::1"), port, 80, CISN, 0, TH_SYN,
                                  65535, MSS), 0)
    assert [p.dst for p in e_sent] == [t6, t6]
    assert all(p.src.startswith(ip_bytes("fd00:99::")[:15]) for p in e_sent)
    assert len({(p.src, p.sport) for p in e_sent}) == 2


# -- -n: copies ------------------------------------------------------------------------

def test_copies_each_complete_with_the_same_bytes_on_distinct_ports(isns):
    r = Rig(copies=50, isns=isns)
    for i in range(4):
        r.session(client_ip(0), 40000 + i, b"req %d" % i)
    syns = r.syns()
    assert len(syns) == 200 == len(set(syns))
    assert r.outcomes() == {"completed": 200}
    got = sorted(r.conns.values())
    assert got == sorted(b"req %d" % i for i in range(4) for _ in range(50))
    assert r.e.st.sessions == 200 and r.e.active() == 0


def test_copies_1000_and_midstream():
    r = Rig(copies=1000, auto=False)
    r.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"mid", sport=40000, cip=client_ip(0))
    assert len(set(r.syns())) == 1000 and r.e.st.fake_syn == 1000


def test_copies_sampled_and_filtered_together():
    r = Rig(copies=5, sample_pct=50, auto=False)
    for i in range(200):
        r.client(TH_SYN, CISN, sport=40000, cip=client_ip(i))
    picked = len(r.syns())
    assert picked % 5 == 0 and 60 < picked // 5 < 140
    assert r.e.st.outcomes["filtered"] == 200 - picked // 5


# -- -f: instances ---------------------------------------------------------------------

def test_instances_never_share_a_tuple():
    tuples = []
    for k in (0, 1):
        r = Rig(Allocator(None, k, 2), copies=3, auto=False)
        for i in range(500):
            r.client(TH_SYN, CISN, sport=30000 + i, cip=client_ip(i % 7))
        syns = r.syns()
        assert len(syns) == 1500 == len(set(syns))
        lo = 1024 + k * 32256
        assert all(lo <= p < lo + 32256 for _, p in syns)
        tuples.append(set(syns))
    assert not tuples[0] & tuples[1]
    # with a pool too
    a = Rig(Allocator(parse_pool("10.99.0.1"), 0, 2), auto=False)
    b = Rig(Allocator(parse_pool("10.99.0.1"), 1, 2), auto=False)
    for r in (a, b):
        for i in range(300):
            r.client(TH_SYN, CISN, sport=40000, cip=client_ip(i))
    assert not set(a.syns()) & set(b.syns())


# -- -r / -g -----------------------------------------------------------------------------

def test_ramp_grows_the_share_from_1_percent():
    r = Rig(ramp=100 * SEC, auto=False)
    assert r.e.share(0) == 100  # before the first packet
    picked = []
    for i in range(4000):  # one new session every 25 ms: 100 s
        r.now = i * 25 * MS
        n = len(r.sent)
        r.client(TH_SYN, CISN, sport=40000, cip=client_ip(i))
        picked.append(len(r.sent) > n)
    first, last = sum(picked[:400]), sum(picked[-400:])  # first / last 10 s
    assert first < 40 and last > 360, (first, last)
    assert r.e.share(50 * SEC) == pytest.approx(50.5)
    assert r.e.share(200 * SEC) == 100
    # with -r 20 the share ends at 20 %
    r = Rig(ramp=10 * SEC, sample_pct=20, auto=False)
    r.client(TH_SYN, CISN, sport=40000, cip=client_ip(0))
    assert r.e.share(5 * SEC) == pytest.approx(10.5) and r.e.share(11 * SEC) == 20


def test_sampled_session_gets_all_its_packets_unsampled_none(isns):
    r = Rig(sample_pct=25, isns=isns)
    for i in range(400):
        r.session(client_ip(i), 40000, b"r%d" % i)
    chosen = {i for i in range(400) if sample_share(client_ip(i), 40000) < 25}
    assert r.outcomes() == {"completed": len(chosen), "filtered": 400 - len(chosen)}
    assert sorted(r.conns.values()) == sorted(b"r%d" % i for i in chosen)


# -- --max-memory ------------------------------------------------------------------------

def test_shedding_new_sessions_while_existing_continue(isns):
    CISN, _, SISN = isns
    r = Rig(isns=isns)
    r.client(TH_SYN, CISN, sport=40000, cip=client_ip(0))
    r.pump()
    r.e.shedding = "memory"
    r.client(TH_SYN, CISN, sport=40000, cip=client_ip(1))
    r.client(TH_SYN, CISN, sport=40000, cip=client_ip(2))
    r.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"shed", sport=40000, cip=client_ip(1))
    r.client(TH_ACK | TH_PSH, CISN + 1, SISN + 1, b"kept", sport=40000, cip=client_ip(0))
    r.pump()
    r.client(TH_ACK | TH_FIN, CISN + 5, SISN + 4, sport=40000, cip=client_ip(0))
    r.pump()
    assert r.outcomes() == {"completed": 1, "shed": 2}
    assert list(r.conns.values()) == [b"kept"]
    assert len(r.warnings) == 1 and "(memory)" in r.warnings[0]
    assert r.e.shed_reasons == {"memory": 2}
    assert "2 shed" in r.e.stats_line()
    r.e.shedding = None
    r.client(TH_SYN, CISN, sport=40000, cip=client_ip(3))
    assert len(r.syns()) == 2


# -- the command line -------------------------------------------------------------------

def test_bad_shaping_values_exit_2_with_one_line():
    base = ["tc-session", "--no-feedback", "--target", "10.2.0.5:80"]
    for args in (["-r", "0"], ["-r", "101"], ["-n", "0"], ["-n", "-3"], ["-c", "10.9.9.0/33"],
                 ["-c", "10.9.9.9-10.9.9.1"], ["-c", "10.9.9.y"], ["-c", "fd00::/64"],
                 ["-c", "10.2.0.5"], ["-c", "10.9.9.1", "-n", "70000"],
                 ["-f", "2/2"], ["-f", "x"], ["-g", "0"], ["-m", "0"], ["-n", "40000",
                                                                     "-f", "1/2"]):
        r = tc.call([*base, *args], input=tc.stream([]))
        err = r.stderr.decode()
        assert r.returncode == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("tc-session: error: "), (args, err)


def test_max_memory_cli_sheds_and_warns_once(tmp_path):
    C = ip_bytes("10.9.0.2")
    recs = [{"t": "pkt", "ts": i, "data": build_tcp(C, O, 5000 + i, 80, CISN, 0, TH_SYN,
                                                     65535, MSS)} for i in range(3)]
    js = tmp_path / "s.json"
    r = tc.call(["tc-session", "--no-feedback", "--target", "10.2.0.5:80", "--drain", "0",
                 "-m", "1", "--stats-json", js], input=tc.stream(recs))
    assert r.returncode == 0, r.stderr
    assert tc.decode(r.stdout) == []
    assert r.stderr.decode().count("overloaded (memory)") == 1, r.stderr
    st = json.loads(js.read_text())
    assert st["outcomes"]["shed"] == 3 and st["shed_reasons"] == {"memory": 3}


def test_cli_pool_copies_and_instance_rewrite_the_syns():
    C = ip_bytes("10.9.0.2")
    recs = [{"t": "pkt", "ts": i, "data": build_tcp(C, O, 40000 + i, 80, CISN, 0, TH_SYN,
                                                     65535, MSS)} for i in range(4)]
    runs = []
    for _ in range(2):
        r = tc.call(["tc-session", "--no-feedback", "--target", "10.2.0.5:80", "--drain", "0",
                     "-c", "10.99.0.0/30", "-n", "3", "-f", "1/4"], input=tc.stream(recs))
        assert r.returncode == 0, r.stderr
        syns = [parse_tcp(x["data"]) for x in tc.decode(r.stdout)]
        runs.append([(p.src, p.sport) for p in syns if p.flags & TH_SYN])
    syns = runs[0]
    assert runs[1] == syns  # reproducible
    assert len(syns) == 12 == len(set(syns))
    assert {a for a, _ in syns} <= {ip_bytes("10.99.0.1"), ip_bytes("10.99.0.2")}
    assert all(1024 + 16128 <= p < 1024 + 2 * 16128 for _, p in syns)


def test_allocator_forgets_idle_addresses_and_keeps_cooling_ones():
    a = Allocator(None, 0, 2)  # -f: every address is tracked

    def never(addr, port, strict):
        return False

    for i in range(100):
        ip = client_ip(i)
        got = a.allocate(ip, 40000, 0, 0, never)
        assert got == (ip, 1024 + (40000 - 1024) % 32256)
        if i:
            a.release(*got, (ip, 40000, 0), i * SEC)
    a._gc(70 * SEC)
    # live (client 0) and released 60 s ago or less (clients 10..99) are kept
    assert set(a.spaces) == {client_ip(i) for i in (0, *range(10, 100))}
    a._gc(200 * SEC)
    assert set(a.spaces) == {client_ip(0)}
