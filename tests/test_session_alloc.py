"""tc-session's client address:port allocator (tcpcopylib.session.alloc): which pairs cool
down after a release, who may have one back early, what the cursor skips, and what garbage
collection may forget. Times are in seconds here; the allocator's reuse_after is 60 s."""

import ipaddress

from tcpcopylib.packet import ip_bytes
from tcpcopylib.session.alloc import Allocator, parse_pool, stable_hash

SEC = 1_000_000_000
POOL = ip_bytes("10.99.0.1")
X, Y, Z = (ip_bytes(f"10.77.0.{i}") for i in (1, 2, 3))  # captured client addresses


class Alloc:
    """An Allocator driven as the engine drives it. held: the (address, port) pairs whose
    tuple the target holds in TIME_WAIT (the engine's `taken` vetoes them when strict)."""

    def __init__(self, *args, **kw):
        self.a = Allocator(*args, **kw)
        self.held = set()

    def _taken(self, addr, port, strict):
        return strict and (addr, port) in self.held

    def open(self, cip, cport, t, copy=0, fake=False):
        """The (address, port) for a connection of captured client cip:cport at t s
        (fake: the engine's own SYN, not the captured one)."""
        return self.a.allocate(cip, cport, copy, int(t * SEC), self._taken, fake)

    def close(self, pair, cip, cport, t, copy=0):
        self.a.release(*pair, (cip, cport, copy), int(t * SEC))


def pool_alloc():
    return Alloc(parse_pool("10.99.0.1"))


# -- cooling: a released pair is not another owner's captured port for 60 s -----------------

def test_another_owner_waits_for_a_released_port_to_cool():
    al = pool_alloc()
    first = al.open(X, 40000, 0)
    assert first == (POOL, 40000)
    al.close(first, X, 40000, 0)
    other = al.open(Y, 40000, 1)                  # another client, the same captured port
    assert other[0] == POOL and other[1] != 40000  # 40000 is cooling
    assert al.open(Z, 40000, 59.9)[1] not in (40000, other[1])
    assert al.open(ip_bytes("10.77.0.4"), 40000, 60) == (POOL, 40000)  # cooled: 60 s on


def test_an_owner_has_its_own_released_port_back_at_once():
    al = pool_alloc()
    first = al.open(X, 40000, 0)
    al.close(first, X, 40000, 0)
    assert al.open(X, 40000, 1) == first  # the captured client reused its port: so do we
    assert al.a.early_reuses == 0


def test_an_owner_does_not_reuse_its_port_while_the_target_holds_it():
    al = pool_alloc()
    first = al.open(X, 40000, 0)
    al.close(first, X, 40000, 0)
    al.held.add(first)  # the target closed first: its TIME_WAIT holds the tuple
    again = al.open(X, 40000, 1)
    assert again[0] == POOL and again[1] != 40000
    al.close(again, X, 40000, 2)
    al.held.clear()  # TIME_WAIT over
    assert al.open(X, 40000, 3) == first


def test_a_copy_is_another_owner():
    al = pool_alloc()
    first = al.open(X, 40000, 0, copy=0)
    al.close(first, X, 40000, 0, copy=0)
    assert al.open(X, 40000, 1, copy=1) != first


# -- the cursor: fresh ports for pairs that had to move -------------------------------------

def test_the_cursor_skips_live_and_cooling_ports():
    al = Alloc(None, 0, 2)  # -f 0/2: ports 1024-33279, every address tracked
    cooling = al.open(X, 1025, 0)
    assert cooling == (X, 1025)
    al.close(cooling, X, 1025, 0)
    assert al.open(X, 1024, 1) == (X, 1024)
    # another copy of X:1024: its port is live, so the cursor's first ports are looked at:
    # 1024 is live, 1025 cooling (released 1 s ago by another owner), 1026 is free
    assert al.open(X, 1024, 1, copy=1) == (X, 1026)


def test_the_cursor_skips_ports_the_target_holds_and_lets_them_cool():
    al = Alloc(None, 0, 2)
    al.held.add((X, 1024))
    assert al.open(X, 1030, 0) == (X, 1030)
    assert al.open(X, 1030, 0, copy=1) == (X, 1025)  # 1024: the target's TIME_WAIT
    al.held.clear()
    # the cursor found 1024 held at 0 s: it cools like a released pair
    assert al.open(X, 1024, 30) != (X, 1024)
    assert al.open(X, 1024, 60, copy=1) == (X, 1024)


def test_a_full_block_reuses_the_least_recently_released_cooled_port_then_early():
    al = Alloc(None, 0, 256)  # -f 0/256: 252 ports, 1024-1275
    pairs = [al.open(X, 1024 + i, 0) for i in range(252)]
    assert pairs == [(X, 1024 + i) for i in range(252)]
    al.close(pairs[7], X, 1031, 1)
    al.close(pairs[3], X, 1027, 2)
    assert al.open(Y, 1024, 10) == (Y, 1024)  # another address: its own ports
    assert al.open(X, 1100, 70, copy=1) == (X, 1031)  # cooled, released first
    assert al.open(X, 1100, 70, copy=2) == (X, 1027)
    assert al.a.early_reuses == 0
    al.close((X, 1031), X, 1100, 80, copy=1)
    assert al.open(X, 1100, 81, copy=3) == (X, 1031)  # nothing cooled: early, counted
    assert al.a.early_reuses == 1
    assert al.open(X, 1100, 82, copy=4) is None  # nothing live is ever shared


# -- garbage collection of idle address spaces -----------------------------------------------

def test_gc_judges_an_address_by_its_newest_release():
    al = Alloc(None, 0, 2)
    live = al.open(Y, 5000, 0)
    old, recent = al.open(X, 2000, 0), al.open(X, 3000, 0)
    al.close(old, X, 2000, 0)
    al.close(recent, X, 3000, 50)
    al.a._gc(70 * SEC)  # X's oldest release is 70 s old, its newest 20 s
    assert set(al.a.spaces) == {X, Y}
    # so X:3000 still cools: another owner may not have it as its captured port
    moved = al.open(X, 3000, 70, copy=1)
    assert moved[0] == X and moved != recent
    al.a._gc(200 * SEC)
    assert set(al.a.spaces) == {X, Y}  # a live pair keeps its address
    al.close(live, Y, 5000, 200)
    al.close(moved, X, 3000, 200, copy=1)
    al.a._gc(261 * SEC)
    assert al.a.spaces == {}


def test_gc_forgets_an_address_once_its_newest_release_has_cooled():
    al = Alloc(None, 0, 2)
    for port, t in ((2000, 0), (3000, 10)):
        al.close(al.open(X, port, t), X, port, t)
    al.a._gc(69 * SEC)
    assert X in al.a.spaces  # the newest release is 59 s old
    al.a._gc(71 * SEC)
    assert X not in al.a.spaces
    assert al.open(X, 3000, 71, copy=1) == (X, 3000)  # forgotten only once cooled


# -- the -c pool: which address, and where a full one passes on -------------------------------

def test_a_client_keeps_its_pool_address_copies_take_the_next_and_a_full_one_passes_on():
    pools = parse_pool("10.99.0.1-10.99.0.3")
    addrs = [pools[4].addr(i) for i in range(3)]
    clients = [ip_bytes(f"10.77.1.{i}") for i in range(1, 40)]
    al = Alloc(pools, 0, 256)  # -f 0/256: 252 ports an address
    for ip in clients[:8]:  # sticky: a stable hash of the client address picks it
        assert al.open(ip, 40000, 0)[0] == addrs[stable_hash(ip) % 3]
    cip = next(ip for ip in clients if stable_hash(ip) % 3 == 2)  # the last address
    al = Alloc(pools, 0, 256)
    assert [al.open(cip, 40000, 0, copy=c)[0] for c in range(3)] == [addrs[2], addrs[0],
                                                                       addrs[1]]
    al = Alloc(pools, 0, 256)
    assert {al.open(cip, 1024 + i, 0)[0] for i in range(252)} == {addrs[2]}
    assert al.open(cip, 2000, 0) == (addrs[0], 1024 + (2000 - 1024) % 252)  # (wraps round)
    assert al.open(ip_bytes("fd00::1"), 40000, 0) is None  # no IPv6 in the pool


def test_a_free_captured_port_comes_before_a_cooled_released_one():
    al = pool_alloc()
    al.close(al.open(X, 40000, 0), X, 40000, 0)
    assert al.open(Y, 50000, 100) == (POOL, 50000)  # not 40000, cooled long ago


def test_captured_addresses_keep_the_port_until_it_is_taken_then_cooling_counts():
    """Without -c and -f the captured pair is kept; an address is tracked once one of its
    ports had to move, and from then on a pair another owner released cools first."""
    a = Allocator()
    live = {(X, 40000)}  # another connection to the same target holds X:40000

    def taken(addr, port, strict):
        return (addr, port) in live

    assert a.allocate(Y, 40000, 0, 0, taken, False) == (Y, 40000)
    assert a.spaces == {}  # nothing tracked in the usual case
    moved = a.allocate(X, 40000, 0, 0, taken, False)
    assert moved == (X, 1024)  # the first port of the cursor
    a.release(*moved, (X, 40000, 0), 0)
    assert a.allocate(X, 1024, 0, SEC, taken, False) == (X, 1025)  # 1024 is cooling
    assert a.allocate(X, 1024, 1, 60 * SEC, taken, False) == (X, 1024)


def test_pool_exclusions_split_ranges_exactly_and_every_range_is_indexed():
    def addrs(spec, exclude=()):
        p = parse_pool(spec, [ip_bytes(x) for x in exclude])[4]
        return [str(ipaddress.ip_address(p.addr(i))) for i in range(p.size)]
    # one address out of the first of two ranges: a one-address part before it is kept,
    # the part after it is whole, the next range untouched
    assert addrs("10.8.0.0/29,10.9.0.1", ["10.8.0.2"]) == [
        "10.8.0.1", "10.8.0.3", "10.8.0.4", "10.8.0.5", "10.8.0.6", "10.9.0.1"]
    assert addrs("10.8.0.0/29", ["10.8.0.5", "10.8.0.6"]) == [
        "10.8.0.1", "10.8.0.2", "10.8.0.3", "10.8.0.4"]
    many = ",".join(f"10.7.{i}.1" for i in range(9))  # nine ranges: the search's every step
    assert addrs(many) == [f"10.7.{i}.1" for i in range(9)]
    assert addrs("10.6.0.1-10.6.0.3,10.6.0.2-10.6.0.5") == [f"10.6.0.{i}" for i in range(1, 6)]


def test_a_pair_released_again_goes_to_the_end_of_the_least_recently_released_order():
    al = Alloc(None, 0, 256)  # 252 ports, 1024-1275
    pairs = [al.open(X, 1024 + i, 0) for i in range(252)]
    al.close(pairs[1], X, 1025, 1)
    al.close(pairs[2], X, 1026, 2)
    assert al.open(X, 1025, 100, copy=1) == (X, 1025)  # its captured port, cooled
    al.close((X, 1025), X, 1025, 110, copy=1)  # released again: now the most recent
    assert al.open(X, 1100, 120, copy=2) == (X, 1026)  # the cooled one, not 1025
    assert al.a.early_reuses == 0


def test_a_captured_pair_live_towards_two_targets_is_released_by_the_last_of_them():
    a = Allocator()  # captured addresses: liveness is per target, the engine's taken says
    free = lambda addr, port, strict: False  # noqa: E731
    held = {(X, 40000)}
    assert a.allocate(X, 40000, 0, 0, lambda ad, p, s: (ad, p) in held, False) == (X, 1024)
    assert a.allocate(X, 2000, 0, 0, free, False) == (X, 2000)  # towards target 1
    assert a.allocate(X, 2000, 0, 0, free, False) == (X, 2000)  # towards target 2
    a.release(X, 2000, (X, 2000, 0), 1 * SEC)
    assert a.allocate(X, 2000, 1, 2 * SEC, free, False) == (X, 2000)  # still live: kept
    a.release(X, 2000, (X, 2000, 1), 3 * SEC)
    a.release(X, 2000, (X, 2000, 0), 4 * SEC)  # the last: now it cools
    assert a.allocate(X, 2000, 2, 5 * SEC, free, False) == (X, 1025)


def test_every_4096th_release_sweeps_the_idle_addresses():
    al = Alloc(None, 0, 2)

    def one(i, t):
        ip = (0x0A500000 + i).to_bytes(4, "big")
        al.close(al.open(ip, 2000, t), ip, 2000, t)
    for i in range(2047):
        one(i, 0)
    one(2047, 100)  # the 2048th release: no sweep
    assert len(al.a.spaces) == 2048
    for i in range(2048, 4095):
        one(i, 100)
    al.close(al.open(X, 2000, 200), X, 2000, 200)  # the 4096th: a sweep at 200 s
    assert set(al.a.spaces) == {X}


def test_a_full_block_looks_at_32_released_pairs_skipping_those_the_target_holds():
    al = Alloc(None, 0, 256)  # 252 ports, 1024-1275
    pairs = [al.open(X, 1024 + i, 0) for i in range(252)]
    for k in range(33):
        al.close(pairs[k], X, 1024 + k, 1)
    al.held.update(pairs[:32])  # the target holds the 32 least recently released
    assert al.open(X, 1100, 100, copy=1) is None  # the 33rd is not looked at
    al.held.discard(pairs[31])  # the 32nd: still looked at
    assert al.open(X, 1100, 100, copy=1) == pairs[31]


def test_a_released_pair_has_cooled_exactly_60_s_after():
    al = Alloc(None, 0, 256)
    pairs = [al.open(X, 1024 + i, 0) for i in range(252)]
    al.close(pairs[9], X, 1033, 10)
    assert al.open(X, 1100, 70, copy=1) == pairs[9]
    assert al.a.early_reuses == 0
