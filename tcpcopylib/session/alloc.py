"""Client address:port allocation for replayed connections (-c, -n, -f) and sampling (-r).

Every replayed connection gets its client (address, port) from an ``Allocator``:

* address: the captured one, or with a pool (-c) the pool address picked by a stable hash
  of the captured client address (sticky, as TCPCopy's -c), plus the copy number (-n), so
  copies spread over the pool; a full address passes to the next one;
* port: the captured port (moved into the instance's block with -f) if that pair is free,
  else the next never-used port of the address (a cursor over the block), else the least
  recently released one.

A pair is live for at most one connection at a time (with the captured address and no
-f, for at most one connection per target, as the captured client had it: there the
engine's by_target map is the authority, and an address is tracked here only once one of
its ports had to move), so replayed connections never collide by construction. A pair released by another session is not
handed out as a captured port again before ``reuse_after`` (the target may hold it in
TIME_WAIT); the engine's ``taken`` callback vetoes tuples it knows the target still holds.
With the same input, sessions start in the same order and get the same pairs.

-f K/M splits the ports 1024-65535 into M blocks and instance K uses only block K, so M
tc-session instances never produce the same client 4-tuple into one target.
"""

from __future__ import annotations

import hashlib
import ipaddress

from tcpcopylib.errors import UsageError

SEC = 1_000_000_000
PORT_LO, PORT_HI = 1024, 65536
LRU_SCAN = 32            # released pairs looked at per address and attempt
GC_EVERY = 4096          # releases between sweeps of idle address spaces


def stable_hash(ip: bytes, port: int = 0) -> int:
    """A 64-bit keyed hash of a packed address and port: the same on every run and host."""
    return int.from_bytes(hashlib.blake2b(ip + port.to_bytes(2, "big"), digest_size=8,
                                          key=b"tc-session").digest(), "big")


def sample_share(ip: bytes, port: int) -> float:
    """Where a client ip:port falls in [0, 100): it is replayed at share P iff below P."""
    return stable_hash(ip, port) % 1_000_000 / 10_000


# -- the -c pool ---------------------------------------------------------------------------

class Pool:
    """Client addresses of one family (4 or 16 bytes), as sorted disjoint ranges."""

    def __init__(self, width: int):
        self.width = width
        self.ranges: list[list[int]] = []  # [start, count]
        self.size = 0
        self._cum: list[int] = []

    def add(self, start: int, count: int) -> None:
        self.ranges.append([start, count])

    def finish(self, exclude=()) -> None:
        """Merge overlaps, drop the excluded addresses (ints), index the ranges."""
        merged: list[list[int]] = []
        for s, n in sorted(self.ranges):
            if merged and s <= merged[-1][0] + merged[-1][1]:
                last = merged[-1]
                last[1] = max(last[1], s + n - last[0])
            else:
                merged.append([s, n])
        for x in sorted(set(exclude)):
            for i, (s, n) in enumerate(merged):
                if s <= x < s + n:
                    parts = [[s, x - s], [x + 1, s + n - x - 1]]
                    merged[i:i + 1] = [p for p in parts if p[1] > 0]
                    break
        self.ranges = merged
        self._cum = []
        total = 0
        for _s, n in merged:
            self._cum.append(total)
            total += n
        self.size = total

    def addr(self, i: int) -> bytes:
        """The i-th address (0 <= i < size), packed."""
        lo, hi = 0, len(self.ranges) - 1
        while lo < hi:  # last range whose cumulative start <= i
            mid = (lo + hi + 1) // 2
            if self._cum[mid] <= i:
                lo = mid
            else:
                hi = mid - 1
        return (self.ranges[lo][0] + i - self._cum[lo]).to_bytes(self.width, "big")


# addresses no client can have: unspecified, broadcast, multicast (and reserved) ones
_NO_CLIENT = {
    4: [(ipaddress.ip_network("0.0.0.0/8"), "\"this network\""),
        (ipaddress.ip_network("224.0.0.0/4"), "multicast"),
        (ipaddress.ip_network("240.0.0.0/4"), "reserved or broadcast")],
    16: [(ipaddress.ip_network("::/128"), "unspecified"),
         (ipaddress.ip_network("ff00::/8"), "multicast")],
}


def _pool_item(item: str):
    """(width, start, count) for one -c item."""
    try:
        if item.endswith(".x"):  # TCPCopy's 62.135.200.x: .1 to .254
            net = ipaddress.IPv4Network(item[:-1] + "0/24")
            return 4, int(net.network_address) + 1, 254
        if "/" in item:  # (strict: 10.0.0.0/0 is a mistake, not 0.0.0.0/0)
            net = ipaddress.ip_network(item, strict=True)
            n = net.num_addresses
            start = int(net.network_address)
            if net.version == 4 and n >= 4:  # no network and broadcast addresses
                start, n = start + 1, n - 2
            return net.max_prefixlen // 8, start, n
        if "-" in item:
            a, b = (ipaddress.ip_address(x.strip()) for x in item.split("-", 1))
            if a.version != b.version or int(b) < int(a):
                raise ValueError("a range is FIRST-LAST of one family, FIRST <= LAST")
            return a.max_prefixlen // 8, int(a), int(b) - int(a) + 1
        a = ipaddress.ip_address(item)
        return a.max_prefixlen // 8, int(a), 1
    except ValueError as e:
        raise UsageError(f"-c: bad address, range or network {item!r}: {e}") from None


def parse_pool(spec: str, exclude=()) -> dict[int, Pool]:
    """-c LIST: addresses, CIDR networks, FIRST-LAST ranges and a.b.c.x, comma-separated.

    Returns {4: Pool, 16: Pool} (only the families present); addresses in exclude (packed,
    e.g. the targets) are left out.
    """
    pools: dict[int, Pool] = {}
    items = [x.strip() for x in spec.split(",")]
    if not any(items):
        raise UsageError("-c: empty address list")
    for item in items:
        if not item:
            continue
        width, start, count = _pool_item(item)
        for net, what in _NO_CLIENT[width]:
            lo = int(net.network_address)
            if start < lo + net.num_addresses and lo < start + count:
                raise UsageError(f"-c: {item} holds {what} addresses ({net}), which cannot "
                                 f"be client addresses")
        pools.setdefault(width, Pool(width)).add(start, count)
    for width, pool in pools.items():
        pool.finish(int.from_bytes(x, "big") for x in exclude if len(x) == width)
        if not pool.size:
            raise UsageError("-c: no usable address left (targets are left out)")
    return pools


def parse_instance(spec: str) -> tuple[int, int]:
    """-f K or K/M (M defaults to 16) -> (K, M)."""
    k, sep, m = spec.partition("/")
    try:
        k, m = int(k), int(m) if sep else 16
    except ValueError:
        raise UsageError(f"-f/--instance takes K or K/M, not {spec!r}") from None
    if not 1 <= m <= 256 or not 0 <= k < m:
        raise UsageError(f"-f/--instance {spec}: need 0 <= K < M <= 256")
    return k, m


def block_size(instances: int) -> int:
    """Client ports in each of the blocks of -f K/M (M = instances)."""
    return (PORT_HI - PORT_LO) // instances


def block_of_port(port: int, instances: int) -> int | None:
    """The K of the -f K/M instance whose block holds client port ``port`` (M = instances);
    None for a port in no block (below 1024, or in the rest above the last block)."""
    k = (port - PORT_LO) // block_size(instances) if port >= PORT_LO else instances
    return k if k < instances else None


# -- allocation ----------------------------------------------------------------------------

class _Space:
    """The ports of one client address."""

    __slots__ = ("live", "released", "cursor")

    def __init__(self, lo):
        self.live = {}       # port -> live connections on it (more than 1: other targets)
        self.released = {}   # port -> (time, owner), least recently released first
        self.cursor = lo     # ports below it were handed out (or skipped) once


class Allocator:
    def __init__(self, pools: dict[int, Pool] | None = None, instance: int = 0,
                 instances: int = 1, reuse_after: int = 60 * SEC):
        self.pools = pools
        self.block = block_size(instances)
        self.lo = PORT_LO + instance * self.block
        self.hi = self.lo + self.block
        self.shift = instances > 1
        # captured address and port kept unless taken: liveness is per target 4-tuple
        self.identity = pools is None and not self.shift
        self.reuse_after = reuse_after
        self.spaces: dict[bytes, _Space] = {}
        self.live = {4: 0, 16: 0}
        self.early_reuses = 0     # pairs reused before reuse_after (pool nearly full)
        self._releases = 0

    def capacity(self, width: int) -> int | None:
        """Pairs available to one family (None: captured addresses, unbounded)."""
        if self.pools is None:
            return None
        pool = self.pools.get(width)
        return pool.size * self.block if pool else 0

    def hint(self, port: int) -> int:
        """The captured port as this instance may use it."""
        if not self.shift:
            return port
        return self.lo + ((port - PORT_LO) if port >= PORT_LO else port) % self.block

    def allocate(self, cip: bytes, cport: int, copy: int, now: int, taken, fake=True):
        """A free (address, port) for a connection of captured client cip:cport, or None.

        taken(addr, port, strict) -> True if the target still holds that tuple (strict:
        also TIME_WAIT; the captured address and port of a captured SYN are not strict).
        """
        owner = (cip, cport, copy)
        hint = self.hint(cport)
        width = len(cip)
        if self.identity and cip not in self.spaces and not taken(cip, hint, fake):
            return cip, hint  # the usual case: nothing to track until a port moves
        if self.pools is None:
            got = self._from_space(cip, hint, owner, now, taken, fake, True) or \
                self._from_space(cip, hint, owner, now, taken, fake, False)
            return (cip, got) if got else None
        pool = self.pools.get(width)
        if pool is None or self.live[width] >= pool.size * self.block:
            return None
        start = (stable_hash(cip) + copy) % pool.size
        for early in (False, True):
            for i in range(pool.size):
                addr = pool.addr((start + i) % pool.size)
                got = self._from_space(addr, hint, owner, now, taken, fake, not early)
                if got:
                    return addr, got
        return None

    def _from_space(self, addr, hint, owner, now, taken, fake, cooled_only):
        sp = self.spaces.get(addr)
        if sp is None:
            sp = self.spaces[addr] = _Space(self.lo)
        live, released = sp.live, sp.released
        port = None
        if cooled_only:
            r = released.get(hint)
            fresh = r is None or r[1] == owner or now - r[0] >= self.reuse_after
            if self.identity:
                if fresh and not taken(addr, hint, fake):
                    port = hint
            elif fresh and not live.get(hint) and not taken(addr, hint, True):
                port = hint
            if port is None:
                while sp.cursor < self.hi:
                    p = sp.cursor
                    sp.cursor += 1
                    if live.get(p) or p in released:
                        continue
                    if taken(addr, p, True):
                        released[p] = (now, None)
                        continue
                    port = p
                    break
        if port is None:
            n = 0
            for p, (t, _o) in released.items():
                if cooled_only and now - t < self.reuse_after or n >= LRU_SCAN:
                    break
                n += 1
                if not live.get(p) and not taken(addr, p, True):
                    port = p
                    if not cooled_only:
                        self.early_reuses += 1
                    break
        if port is None:
            return None
        released.pop(port, None)
        live[port] = live.get(port, 0) + 1
        self.live[len(addr)] += 1
        return port

    def release(self, addr: bytes, port: int, owner, now: int) -> None:
        sp = self.spaces.get(addr)
        if sp is None or not sp.live.get(port):
            return
        self.live[len(addr)] -= 1
        n = sp.live[port] - 1
        if n:
            sp.live[port] = n
        else:
            del sp.live[port]
            sp.released[port] = (now, owner)
        self._releases += 1
        if self._releases % GC_EVERY == 0:
            self._gc(now)

    def _gc(self, now):
        """Forget addresses with nothing live and nothing released recently."""
        old = now - self.reuse_after
        for addr in [a for a, sp in self.spaces.items() if not sp.live and
                     (not sp.released or next(reversed(sp.released.values()))[0] < old)]:
            del self.spaces[addr]  # released is in release order: the last is the newest
