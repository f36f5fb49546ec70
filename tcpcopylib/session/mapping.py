"""Which captured sessions are replayed, and where to: --target, --any-port and -x.

A rule maps an online service (optional IP, port) to a target (IP, port). A captured
client->server packet is replayed iff its (dst ip, dst port) matches a rule: an exact
IP+port rule, or a rule without IP for that port; the first matching rule wins
(TCPCopy's -x semantics, reference spec §3.1). With ``any_port`` every TCP session is
replayed to the target IP, keeping its server port (or mapped to the target port when
one is given).
"""

from __future__ import annotations

from tcpcopylib.errors import UsageError
from tcpcopylib.packet import ip_bytes, parse_endpoint


class Rule:
    __slots__ = ("online_ip", "online_port", "target_ip", "target_port")

    def __init__(self, online_ip, online_port, target_ip, target_port):
        self.online_ip = online_ip      # packed bytes or None (= any address)
        self.online_port = online_port  # int
        self.target_ip = target_ip      # packed bytes
        self.target_port = target_port  # int, or None: keep the captured port

    def __repr__(self):
        return (f"Rule({self.online_ip!r}, {self.online_port}, "
                f"{self.target_ip!r}, {self.target_port})")


def _strip_mac(text: str) -> str:
    # TCPCopy's "port@MAC" suffix: MACs belong to link-layer output (tc-emit), not here.
    if "@" in text:
        text, _, mac = text.partition("@")
        if len(mac.split(":")) != 6:
            raise UsageError(f"bad MAC address in transfer item: {mac!r}")
    return text


def _parse_online(text: str) -> tuple[bytes | None, int]:
    text = _strip_mac(text)
    if text.isdigit():
        port = int(text)
        if not 0 < port < 65536:
            raise UsageError(f"bad port in transfer item: {text!r}")
        return None, port
    try:
        return parse_endpoint(text)
    except ValueError as e:
        raise UsageError(f"bad online address in transfer item: {e}") from None


def parse_transfer(spec: str) -> list[Rule]:
    """TCPCopy's -x list: ``[IP:]PORT-IP:PORT`` items separated by commas.

    IPv6 addresses are written in brackets: ``[2001:db8::1]:80-[2001:db8::5]:8080``.
    An optional ``@MAC`` suffix on either side is accepted and ignored.
    """
    rules = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        online, sep, target = item.partition("-")
        if not sep:
            raise UsageError(f"transfer item needs ONLINE-TARGET: {item!r}")
        oip, oport = _parse_online(online)
        try:
            tip, tport = parse_endpoint(_strip_mac(target))
        except ValueError as e:
            raise UsageError(f"bad target in transfer item {item!r}: {e}") from None
        if oip is not None and len(oip) != len(tip):
            raise UsageError(f"transfer item mixes IPv4 and IPv6: {item!r}")
        rules.append(Rule(oip, oport, tip, tport))
    if not rules:
        raise UsageError("empty transfer list")
    return rules


def parse_target(spec: str, any_port: bool) -> list[Rule]:
    """--target HOST:PORT (captured server port PORT -> HOST:PORT).

    With any_port, HOST alone keeps each session's server port and HOST:PORT sends
    every session to PORT.
    """
    if any_port:
        try:
            ip = ip_bytes(spec)
            return [Rule(None, None, ip, None)]
        except ValueError:
            pass
    try:
        ip, port = parse_endpoint(spec)
    except ValueError as e:
        raise UsageError(f"--target: {e}") from None
    return [Rule(None, None if any_port else port, ip, port)]


class Mapper:
    """Answers: is this client->server packet replayed, and to which target?"""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self.any_port = any(r.online_port is None for r in rules)
        self._exact = {}
        self._port = {}
        for r in rules:
            if r.online_port is None:
                continue
            if r.online_ip is not None:
                self._exact.setdefault((r.online_ip, r.online_port), r)
            else:
                self._port.setdefault(r.online_port, r)
        self._any = next((r for r in rules if r.online_port is None), None)

    def target(self, dst_ip: bytes, dst_port: int):
        """(target ip, target port) for a packet to dst_ip:dst_port, or None."""
        r = self._exact.get((dst_ip, dst_port)) or self._port.get(dst_port) or self._any
        if r is None or len(r.target_ip) != len(dst_ip):
            return None
        return r.target_ip, (dst_port if r.target_port is None else r.target_port)

    def is_service(self, ip: bytes, port: int) -> bool:
        """True if ip:port is a mapped online service (used to spot server->client)."""
        if self.any_port:
            return False
        return (ip, port) in self._exact or port in self._port

    def server_datagram_test(self):
        """A test on a raw datagram, cheap enough to run on every input packet before it is
        queued: True for a TCP segment of plain IPv4 (no IP options, not a fragment) sent
        from a mapped service, i.e. the server->client half of a capture, which is only
        counted (is_service() on the parsed packet says the same; other datagrams go the
        parsed way). None if services are not known by port (any_port)."""
        if self.any_port:
            return None
        ports = frozenset(port.to_bytes(2, "big") for port in self._port)
        exact = frozenset(ip + port.to_bytes(2, "big") for ip, port in self._exact
                          if len(ip) == 4)

        def from_service(d) -> bool:
            return (len(d) >= 40 and d[0] == 0x45 and d[9] == 6 and not d[6] & 0x1F
                    and not d[7] and (d[20:22] in ports or d[12:16] + d[20:22] in exact))

        def from_service_port(d) -> bool:
            # the usual client packet fails at the first test (its source port)
            return (d[20:22] in ports and len(d) >= 40 and d[0] == 0x45 and d[9] == 6
                    and not d[6] & 0x1F and not d[7])

        return from_service if exact else from_service_port
