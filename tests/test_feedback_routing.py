"""tc-feedback's routing keys and inline scanners, as functions: route_key / reply_key of
a reply (IPv4 with and without options, IPv6, inside a larger buffer, too short),
claim_route_key of a claim entry, claim_keys (the inline claim reader) at its
encoding boundaries. (The inline fb reader, wire.fb_spans: test_wire.py.)

Fast (no sockets): bench/mutate.py runs this file for the feedback module."""

from __future__ import annotations

import socket
import struct

import cbor2
import pytest

from tcpcopylib.feedback import claim_keys, claim_route_key, reply_key, route_key


def ip4(src: str, dst: str, sport: int, dport: int, options: bytes = b"",
        payload: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 2, 0x50, 0x18, 1000, 0, 0) + payload
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(tcp), 7, 0, 64, 6, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    return head + options + tcp


def ip6(src: str, dst: str, sport: int, dport: int, payload: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 2, 0x50, 0x18, 1000, 0, 0) + payload
    return (struct.pack("!IHBB", 0x60000000, len(tcp), 6, 64)
            + socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + tcp)


def claim_key(entry) -> tuple:
    """The (client ip, client port, target ip, target port) a claim entry asks for, as
    reply_key gives them."""
    cip, cport, tip, tport = entry
    return (_packed(cip), int(cport), _packed(tip), int(tport))


def _packed(ip: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)


# A reply from the target (tip:tport) to the client (cip:cport), and the claim entry
# [cip, cport, tip, tport] that asks for it.
CASES = [
    ("v4", lambda: ip4("10.1.2.3", "192.168.7.9", 8080, 40001), ["192.168.7.9", 40001, "10.1.2.3", 8080]),
    ("v4-options", lambda: ip4("10.1.2.3", "192.168.7.9", 443, 65535, options=b"\x01" * 8,
                               payload=b"hello"), ["192.168.7.9", 65535, "10.1.2.3", 443]),
    ("v4-40-byte-options", lambda: ip4("10.0.0.255", "10.0.0.1", 1, 2, options=b"\x01" * 40),
     ["10.0.0.1", 2, "10.0.0.255", 1]),
    ("v6", lambda: ip6("2001:db8::5", "2001:db8:ffff::77", 80, 51234, payload=b"x" * 30),
     ["2001:db8:ffff::77", 51234, "2001:db8::5", 80]),
]


@pytest.mark.parametrize("name,make,entry", CASES, ids=[c[0] for c in CASES])
def test_a_reply_routes_to_the_claim_that_asks_for_it(name, make, entry):
    d = make()
    assert route_key(d) == claim_route_key(entry)
    assert reply_key(d) == claim_key(entry)
    assert reply_key(d)[1] == entry[1] and reply_key(d)[3] == entry[3]
    # inside a larger buffer: off and end select it, the bytes around do not matter
    for pre, post in ((b"", b""), (b"\x45" * 3, b""), (b"\x60" * 7, b"\xff" * 50)):
        buf = pre + d + post
        assert route_key(buf, len(pre), len(pre) + len(d)) == claim_route_key(entry)
        assert reply_key(buf, len(pre), len(pre) + len(d)) == claim_key(entry)
        assert route_key(bytearray(buf), len(pre), len(pre) + len(d)) == claim_route_key(entry)
    # a claim for another port, address or direction is another key
    for other in ([entry[0], entry[1] ^ 1, entry[2], entry[3]],
                  [entry[0], entry[1], entry[2], entry[3] ^ 1],
                  [entry[2], entry[3], entry[0], entry[1]]):
        assert route_key(d) != claim_route_key(other)
        assert reply_key(d) != claim_key(other)


def test_the_ipv4_key_without_options_is_one_slice():
    """tc-feedback's hot loop takes the key of an IPv4 reply without options as the slice
    [12:24] of the datagram: route_key must give exactly that."""
    d = ip4("10.1.2.3", "192.168.7.9", 8080, 40001, payload=b"abc")
    assert route_key(d) == d[12:24]
    assert route_key(b"junk" + d, 4) == d[12:24]
    assert len(route_key(ip6("::1", "::2", 1, 2))) == 36


@pytest.mark.parametrize("fn", [route_key, reply_key])
def test_too_short_or_not_ip_has_no_key(fn):
    v4 = ip4("10.1.2.3", "10.3.2.1", 5, 6)             # 40 bytes: the ports end at 24
    v4o = ip4("10.1.2.3", "10.3.2.1", 5, 6, b"\x01" * 12)  # ports end at 36
    v6 = ip6("::1", "::2", 5, 6)                       # the ports end at 44
    assert fn(v4[:24]) is not None and fn(v4[:23]) is None
    assert fn(v4o[:36]) is not None and fn(v4o[:35]) is None
    assert fn(v6[:44]) is not None and fn(v6[:43]) is None
    assert fn(v4[:19]) is None and fn(b"") is None
    # the same limits with off/end
    buf = b"\x00" * 5 + v4 + b"\x00" * 40
    assert fn(buf, 5, 5 + 24) is not None and fn(buf, 5, 5 + 23) is None
    assert fn(buf, 5, 5 + 19) is None
    buf6 = b"\x00" * 3 + v6 + b"\x00" * 40
    assert fn(buf6, 3, 3 + 44) is not None and fn(buf6, 3, 3 + 43) is None
    # end -1 is the end of the buffer
    assert fn(v4, 0, -1) == fn(v4)
    # neither IPv4 nor IPv6 (version 5, 7, 0), even when long enough
    for b0 in (0x55, 0x75, 0x05, 0x35):
        assert fn(bytes([b0]) + v6[1:]) is None
    # an IPv4 header with options whose ports lie beyond the end
    assert fn(ip4("10.0.0.1", "10.0.0.2", 1, 2, b"\x01" * 40)[:61]) is None


def test_claim_route_key_port_limits():
    assert claim_route_key(["10.0.0.1", 0, "10.0.0.2", 65535])[-4:] == b"\xff\xff\x00\x00"
    assert claim_route_key(["10.0.0.1", 65535, "10.0.0.2", 0])[-4:] == b"\x00\x00\xff\xff"
    assert claim_route_key(["10.0.0.1", "80", "10.0.0.2", "8080"]) == \
        claim_route_key(["10.0.0.1", 80, "10.0.0.2", 8080])
    for bad in ([65536, 1], [1, 65536], [-1, 1], [1, -1]):
        with pytest.raises(ValueError):
            claim_route_key(["10.0.0.1", bad[0], "10.0.0.2", bad[1]])
    with pytest.raises(ValueError):
        claim_route_key(["10.0.0.300", 1, "10.0.0.2", 2])
    assert claim_key(["10.0.0.1", "7", "::1", 9]) == (
        socket.inet_aton("10.0.0.1"), 7, socket.inet_pton(socket.AF_INET6, "::1"), 9)


@pytest.mark.parametrize("port", [0, 1, 23, 24, 25, 255, 256, 257, 4660, 65535])
def test_claim_keys_reads_every_port_encoding(port):
    for entry in (["10.0.0.1", port, "10.0.0.2", 80], ["10.0.0.1", 80, "10.0.0.2", port],
                  ["2001:db8::1", port, "10.9.8.7", port]):
        for kind in ("add", "del"):
            enc = cbor2.dumps({"t": "claim", kind: [entry]})
            assert claim_keys(enc, 0) == (kind == "add", [claim_route_key(entry)], len(enc))
            assert claim_keys(b"\x00" + enc + b"\xa1", 1) == (
                kind == "add", [claim_route_key(entry)], len(enc) + 1)


@pytest.mark.parametrize("n", [0, 1, 23, 24, 25, 255, 256, 257])
def test_claim_keys_reads_every_array_length(n):
    entries = [[f"10.0.{i >> 8}.{i & 255}", 1000 + i, "10.9.9.9", 80] for i in range(n)]
    enc = cbor2.dumps({"t": "claim", "add": entries})
    assert claim_keys(enc, 0) == (True, [claim_route_key(e) for e in entries], len(enc))
    if n:
        assert claim_keys(enc[:-1], 0) is None


@pytest.mark.parametrize("cip", ["1.2.3.4", "2001:db8:0:0:1:2:3:44",      # 21 characters
                                 "2001:db8:0:0:1:2:3:444",                # 22
                                 "2001:db8:0:0:1:2:33:444",               # 23: the last short
                                 "2001:db8:0:0:1:2:333:444",              # 24: 0x78 n
                                 "2001:db8:0:0:1:22:333:444",             # 25
                                 "::ffff:255.255.255.255"])
def test_claim_keys_reads_every_address_text_length(cip):
    entry = [cip, 5, cip, 6]
    enc = cbor2.dumps({"t": "claim", "del": [entry, entry]})
    assert claim_keys(enc, 0) == (False, [claim_route_key(entry)] * 2, len(enc))
    # a text that is not an address, a port that is not a small uint: left to the decoder
    for bad in ([cip + "x", 5, cip, 6], [cip, 5, cip, 70000], [cip, 5, cip, "6"]):
        assert claim_keys(cbor2.dumps({"t": "claim", "del": [bad]}), 0) is None


def test_claim_keys_leaves_other_records_to_the_decoder():
    for other in ({"t": "fb", "ts": 1, "data": b"", "len": 0}, {"t": "claim"},
                  {"t": "claim", "add": [[1, 2, 3, 4]]}, {"t": "claim", "ad": []},
                  {"t": "claim", "add": {}}, {"t": "claim", "add": [["10.0.0.1", 1]]},
                  [1, 2, 3]):
        assert claim_keys(cbor2.dumps(other), 0) is None


@pytest.mark.parametrize("fn", [route_key, reply_key])
def test_an_empty_range_has_no_key(fn):
    d = ip4("10.1.2.3", "192.168.7.9", 8080, 40001)
    assert fn(d, 0, 0) is None and fn(d + d, len(d), len(d)) is None
