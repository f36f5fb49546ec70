"""A TCPCopy lab built from network namespaces on this machine (needs root).

Topology (modelled on the feasibility lab's netlab.sh)::

    client 10.200.9.2 (up0) -- veth -- (cli0) 10.200.9.1  online  10.200.1.1 (lan0)
                                                                       |
                                         switch: bridge br0 (sw-on, sw-tg, sw-as)
                                           |                                 |
                    target 10.200.1.2 (lan0)               assistant 10.200.1.3 (lan0)
                    route 10.200.9.0/24 via 10.200.1.3      forwarding off: replies die here

IPv6 mirrors it: client net fd00:200:9::/64 (client ::2, online ::1), LAN fd00:200:1::/64
(online ::1, target ::2, assistant ::3). Nobody forwards, DAD is off, neighbour entries are
static (no ARP/ND delay or noise), veth offloads are off unless ``offloads=True``, and the
switch is a plain bridge (frames it forwards skip netfilter even where br_netfilter is loaded).

Every Lab gets its own namespace names (``tcl<pid>x<n>-<host>``), so parallel tests never
clash; labs still alive at interpreter exit are removed by an atexit hook, and
``cleanup_stale()`` (run by every ``up()``) removes the namespaces of dead processes.

    with Lab() as lab:
        srv = lab.start_server("online", port=8080)
        lab.run("client", ["curl", f"http://{lab.online_cli_ip}:8080/"])

CLI: ``python3 -m tcpcopylib.lab up [--name N] [--offloads] | down [--name N] | status [--name N]``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

HOSTS = ("client", "online", "switch", "target", "assistant")

# offload features that change what captures see on veth (feasibility.md 4.1)
OFFLOAD_FEATURES = ("tso", "gso", "gro", "tx", "rx", "sg")

_counter = itertools.count(1)
_live: set = set()
_live_lock = threading.Lock()
_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWNET = 0x40000000
_STALE_RE = re.compile(r"^tcl(\d+)x\d+-[a-z][a-z0-9]*$")  # HOSTS and add_host() names


class LabError(RuntimeError):
    """The lab could not be built or torn down."""


def _ip(*args, input=None, check=True):
    r = subprocess.run(["ip", *args], input=input, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def netns_list() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.strip()]


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@contextlib.contextmanager
def in_netns(ns: str):
    """Run the body (this thread only) inside network namespace `ns`.

    Sockets created in the body stay in `ns` for their whole life.
    """
    cur = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        new = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(new)
            try:
                yield
            finally:
                _setns(cur)
        finally:
            os.close(new)
    finally:
        os.close(cur)


def _kill_ns_pids(ns: str) -> None:
    """Kill what still runs inside one of OUR namespaces (only our tests start things there)."""
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in out:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def delete_namespaces(names) -> list[str]:
    """Delete the given namespaces (those that exist); returns the ones deleted."""
    existing = set(netns_list())
    done = []
    for ns in names:
        if ns in existing:
            _kill_ns_pids(ns)
            _ip("netns", "del", ns, check=False)
            done.append(ns)
    return done


def cleanup_stale() -> list[str]:
    """Remove auto-named lab namespaces whose creating process is gone."""
    stale = []
    for ns in netns_list():
        m = _STALE_RE.match(ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            stale.append(ns)
    return delete_namespaces(stale)


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8),
                ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def attach_bpf(sock: socket.socket, expr: str) -> None:
    """Compile a tcpdump expression (Ethernet link type) with pcapy and attach it to sock."""
    import pcapy

    from tcpcopylib.link import LINKTYPE_ETHERNET

    insns = pcapy.compile(LINKTYPE_ETHERNET, 65535, expr, 1, 0xFFFFFFFF).get_bpf()
    arr = (_SockFilter * len(insns))(*[_SockFilter(*i) for i in insns])
    prog = _SockFprog(len(insns), arr)
    sock.setsockopt(socket.SOL_SOCKET, 26,  # SO_ATTACH_FILTER
                    bytes(ctypes.string_at(ctypes.addressof(prog), ctypes.sizeof(prog))))


ETH_P_ALL = 3


class Sniffer:
    """An AF_PACKET socket on one lab interface (opened inside its namespace).

    ``frames(wait)`` returns [(pkttype, ip_datagram)] seen so far (pkttype 0 host, 3 other
    host, 4 outgoing). The socket is opened with protocol 0 (it receives nothing), the filter
    attached, and only then bound to the interface for every protocol: a socket opened for
    ETH_P_ALL would queue frames of any interface before the filter is in place.
    """

    def __init__(self, ns: str, iface: str, bpf: str | None = None):
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                if bpf:
                    attach_bpf(self.sock, bpf)
                self.sock.bind((iface, ETH_P_ALL))  # (Python puts it in network order)
            except BaseException:
                self.sock.close()
                raise
        self.sock.setblocking(False)
        self.seen: list[tuple[int, bytes]] = []

    def frames(self, wait: float = 0.0) -> list[tuple[int, bytes]]:
        """Collect frames for `wait` seconds (at least one non-blocking pass)."""
        import select

        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            r, _, _ = select.select([self.sock], [], [], max(left, 0))
            if r:
                while True:
                    try:
                        frame, addr = self.sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    self.seen.append((addr[2], frame[14:]))
            if left <= 0:
                return list(self.seen)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Lab:
    """The five-namespace lab; a context manager (``up()`` on enter, ``down()`` on exit)."""

    # IPv4
    client_net, lan_net = "10.200.9.0/24", "10.200.1.0/24"
    client_ip, online_cli_ip = "10.200.9.2", "10.200.9.1"
    online_ip, target_ip, assist_ip = "10.200.1.1", "10.200.1.2", "10.200.1.3"
    # IPv6
    client_net6, lan_net6 = "fd00:200:9::/64", "fd00:200:1::/64"
    client_ip6, online_cli_ip6 = "fd00:200:9::2", "fd00:200:9::1"
    online_ip6, target_ip6, assist_ip6 = "fd00:200:1::1", "fd00:200:1::2", "fd00:200:1::3"
    # interfaces (names inside each namespace)
    client_if, online_cli_if = "up0", "cli0"
    online_if = target_if = assist_if = "lan0"
    bridge_if = "br0"
    switch_ports = ("sw-on", "sw-tg", "sw-as")
    # fixed MAC addresses (each lab has its own bridge, so they never clash)
    client_mac, online_cli_mac = "02:00:00:00:09:02", "02:00:00:00:09:01"
    online_mac, target_mac = "02:00:00:00:01:01", "02:00:00:00:01:02"
    assist_mac = "02:00:00:00:01:03"

    def __init__(self, name: str | None = None, offloads: bool = False,
                 without_target_route: bool = False):
        self.persistent = name is not None
        self.name = name or f"tcl{os.getpid()}x{next(_counter)}"
        self.offloads = offloads
        self.without_target_route = without_target_route
        self.procs: list[subprocess.Popen] = []
        self.is_up = False
        self.extra_hosts: dict[str, tuple] = {}  # add_host(): name -> (ip, ip6, mac)

    # -- names -------------------------------------------------------------------------
    def ns(self, host: str) -> str:
        if host not in HOSTS and host not in self.extra_hosts:
            raise ValueError(f"unknown lab host {host!r} (one of {', '.join(HOSTS)})")
        return f"{self.name}-{host}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(h) for h in (*HOSTS, *self.extra_hosts)]

    def interfaces(self) -> list[tuple[str, str]]:
        """(host, interface) for every lab link end."""
        return [("client", self.client_if), ("online", self.online_cli_if),
                ("online", self.online_if), ("target", self.target_if),
                ("assistant", self.assist_if), ("switch", self.bridge_if),
                *(("switch", p) for p in self.switch_ports)]

    # -- build / tear down -------------------------------------------------------------
    def __enter__(self):
        self.up()
        return self

    def __exit__(self, *exc):
        self.down()
        return False

    def up(self) -> "Lab":
        if self.is_up:
            return self
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces)")
        cleanup_stale()  # leftovers of killed runs (SIGKILL skips atexit)
        clash = set(self.namespaces) & set(netns_list())
        if clash:
            raise LabError(f"namespaces exist already: {' '.join(sorted(clash))} "
                           f"(run: python3 -m tcpcopylib.lab down --name {self.name})")
        if not self.persistent:
            with _live_lock:
                _live.add(self)
        self.is_up = True  # from here on, down() must clean up whatever exists
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _sysctl(self, host: str, settings: dict) -> None:
        args = [f"{k}={v}" for k, v in settings.items()]
        r = subprocess.run(["ip", "netns", "exec", self.ns(host), "sysctl", "-qw", *args],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise LabError(f"sysctl in {self.ns(host)}: {r.stderr.strip()}")

    def _batch(self, host: str, lines: list[str]) -> None:
        _ip("-n", self.ns(host), "-batch", "-", input="\n".join(lines) + "\n")

    def _build(self) -> None:
        for ns in self.namespaces:
            _ip("netns", "add", ns)
        # before any link exists, so new interfaces inherit the defaults
        common = {"net.ipv4.ip_forward": 0, "net.ipv6.conf.all.forwarding": 0,
                  "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}
        for which in ("all", "default"):
            common.update({f"net.ipv6.conf.{which}.accept_dad": 0,
                           f"net.ipv6.conf.{which}.dad_transmits": 0,
                           f"net.ipv6.conf.{which}.router_solicitations": 0,
                           f"net.ipv6.conf.{which}.accept_ra": 0})
        for h in HOSTS:
            if h == "switch":  # the bridge needs no IP at all
                self._sysctl(h, {"net.ipv6.conf.all.disable_ipv6": 1,
                                 "net.ipv6.conf.default.disable_ipv6": 1})
                if os.path.exists("/proc/sys/net/bridge"):
                    # br_netfilter is loaded: bridged frames would go through this
                    # namespace's (empty) netfilter hooks; a plain switch skips them
                    # (~12 % of the kernel time of sending into the lab)
                    self._sysctl(h, {f"net.bridge.bridge-nf-call-{t}": 0
                                     for t in ("iptables", "ip6tables", "arptables")})
            else:
                self._sysctl(h, common)
        on, tg, asn, cl = (self.ns(h) for h in ("online", "target", "assistant", "client"))
        self._batch("switch", [
            "link set lo up",
            "link add br0 type bridge stp_state 0 forward_delay 0",
            f"link add sw-on type veth peer name {self.online_if} netns {on}",
            f"link add sw-tg type veth peer name {self.target_if} netns {tg}",
            f"link add sw-as type veth peer name {self.assist_if} netns {asn}",
            *(f"link set {p} master br0" for p in self.switch_ports),
        ])
        self._batch("client", [
            f"link add {self.client_if} type veth peer name {self.online_cli_if} netns {on}"])
        if not self.offloads:
            self.set_offloads(False)
        self._batch("switch", ["link set br0 up", *(f"link set {p} up" for p in self.switch_ports)])

        def link(dev, mac, *addrs):
            return [f"link set {dev} address {mac}", f"link set {dev} up",
                    *(f"addr add {a} dev {dev}" + (" nodad" if ":" in a else "") for a in addrs)]

        def neigh(dev, *pairs):
            return [f"neigh replace {ip} lladdr {mac} nud permanent dev {dev}" for ip, mac in pairs]

        cli_side = [(self.client_ip, self.client_mac), (self.client_ip6, self.client_mac)]
        onl_cli_side = [(self.online_cli_ip, self.online_cli_mac),
                        (self.online_cli_ip6, self.online_cli_mac)]
        lan = {"online": [(self.online_ip, self.online_mac), (self.online_ip6, self.online_mac)],
               "target": [(self.target_ip, self.target_mac), (self.target_ip6, self.target_mac)],
               "assistant": [(self.assist_ip, self.assist_mac), (self.assist_ip6, self.assist_mac)]}

        def lan_neigh(me):
            return neigh("lan0", *(p for h, ps in lan.items() if h != me for p in ps))

        self._batch("client", [
            "link set lo up",
            *link(self.client_if, self.client_mac, f"{self.client_ip}/24", f"{self.client_ip6}/64"),
            *neigh(self.client_if, *onl_cli_side)])
        self._batch("online", [
            "link set lo up",
            *link(self.online_cli_if, self.online_cli_mac, f"{self.online_cli_ip}/24",
                  f"{self.online_cli_ip6}/64"),
            *link(self.online_if, self.online_mac, f"{self.online_ip}/24", f"{self.online_ip6}/64"),
            *neigh(self.online_cli_if, *cli_side), *lan_neigh("online")])
        routes = [] if self.without_target_route else [
            f"route add {self.client_net} via {self.assist_ip} dev {self.target_if}",
            f"route add {self.client_net6} via {self.assist_ip6} dev {self.target_if}"]
        self._batch("target", [
            "link set lo up",
            *link(self.target_if, self.target_mac, f"{self.target_ip}/24", f"{self.target_ip6}/64"),
            *lan_neigh("target"), *routes])
        self._batch("assistant", [
            "link set lo up",
            *link(self.assist_if, self.assist_mac, f"{self.assist_ip}/24", f"{self.assist_ip6}/64"),
            *lan_neigh("assistant")])

    def add_host(self, name: str, ip: str, ip6: str, mac: str | None = None) -> str:
        """One more host on the switch (a second online host, say): namespace NAME with
        lan0 at ip/24 and ip6/64 on the LAN, static neighbour entries both ways, offloads
        as the lab's. Removed with the lab. Returns the namespace name."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", name) or name in HOSTS or \
                name in self.extra_hosts:
            raise ValueError(f"bad or used lab host name {name!r}")
        mac = mac or "02:00:00:00:01:%02x" % (0x10 + len(self.extra_hosts))
        self.extra_hosts[name] = (ip, ip6, mac)
        ns = self.ns(name)
        port = f"sw-{name}"
        _ip("netns", "add", ns)
        self._sysctl(name, {"net.ipv4.ip_forward": 0, "net.ipv6.conf.all.forwarding": 0,
                            "net.ipv4.conf.all.rp_filter": 0,
                            "net.ipv4.conf.default.rp_filter": 0,
                            "net.ipv6.conf.all.accept_dad": 0,
                            "net.ipv6.conf.default.accept_dad": 0,
                            "net.ipv6.conf.default.accept_ra": 0})
        self._batch("switch", [f"link add {port} type veth peer name lan0 netns {ns}",
                               f"link set {port} master br0", f"link set {port} up"])
        if not self.offloads:
            script = "; ".join(f"ethtool -K {d} {f} off 2>/dev/null" for d in ("lan0",)
                               for f in OFFLOAD_FEATURES)
            subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", script + "; true"],
                           capture_output=True)
            script = "; ".join(f"ethtool -K {port} {f} off 2>/dev/null"
                               for f in OFFLOAD_FEATURES)
            subprocess.run(["ip", "netns", "exec", self.ns("switch"), "sh", "-c",
                            script + "; true"], capture_output=True)
        lan = [(self.online_ip, self.online_mac), (self.online_ip6, self.online_mac),
               (self.target_ip, self.target_mac), (self.target_ip6, self.target_mac),
               (self.assist_ip, self.assist_mac), (self.assist_ip6, self.assist_mac)]
        self._batch(name, [
            "link set lo up", f"link set lan0 address {mac}", "link set lan0 up",
            f"addr add {ip}/24 dev lan0", f"addr add {ip6}/64 dev lan0 nodad",
            *(f"neigh replace {a} lladdr {m} nud permanent dev lan0" for a, m in lan)])
        for host in ("online", "target", "assistant"):
            self._batch(host, [f"neigh replace {a} lladdr {mac} nud permanent dev lan0"
                               for a in (ip, ip6)])
        return ns

    def set_offloads(self, on: bool) -> None:
        """Turn the veth/bridge offloads (tso gso gro tx rx sg) on or off on every lab link."""
        if shutil.which("ethtool") is None:
            raise LabError("ethtool not found: apt-get install ethtool (or Lab(offloads=True))")
        mode = "on" if on else "off"
        byhost: dict[str, list[str]] = {}
        for host, dev in self.interfaces():
            byhost.setdefault(host, []).append(dev)
        for host, devs in byhost.items():
            # one feature per call: ethtool gives up on the whole call for a fixed feature
            script = "; ".join(f"ethtool -K {d} {f} {mode} 2>/dev/null" for d in devs
                               for f in OFFLOAD_FEATURES)
            subprocess.run(["ip", "netns", "exec", self.ns(host), "sh", "-c", script + "; true"],
                           capture_output=True)

    def down(self) -> None:
        """Stop the processes started here (by PID), then delete the namespaces."""
        for p in self.procs:
            self._stop(p)
        self.procs.clear()
        delete_namespaces(self.namespaces)
        self.extra_hosts.clear()
        self.is_up = False
        with _live_lock:
            _live.discard(self)

    # -- running things in hosts -------------------------------------------------------
    def cmd(self, host: str, argv) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *map(str, argv)]

    def run(self, host: str, argv, **kw) -> subprocess.CompletedProcess:
        """subprocess.run(argv) inside `host` (keyword arguments passed through)."""
        return subprocess.run(self.cmd(host, argv), **kw)

    def popen(self, host: str, argv, **kw) -> subprocess.Popen:
        """subprocess.Popen(argv) inside `host`; the caller owns (and stops) the process."""
        return subprocess.Popen(self.cmd(host, argv), **kw)

    def enter(self, host: str):
        """Context manager: this thread runs inside `host` (sockets made there stay there)."""
        return in_netns(self.ns(host))

    def start_server(self, host: str, argv=None, port: int | None = 8080, directory=None,
                     timeout: float = 5.0, **kw) -> subprocess.Popen:
        """Start a server in `host`, stopped (by PID) at teardown.

        Default: ``python3 -m http.server PORT --bind ::`` (IPv4 and IPv6). With `port`, wait
        until something listens on it in `host`.
        """
        if argv is None:
            argv = [sys.executable, "-m", "http.server", str(port), "--bind", "::"]
            if directory is not None:
                argv += ["--directory", str(directory)]
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = self.popen(host, argv, **kw)
        self.procs.append(p)
        if port is not None:
            self.wait_listening(host, port, timeout, proc=p)
        return p

    def wait_listening(self, host: str, port: int, timeout: float = 5.0, proc=None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(host, ["ss", "-Htln", f"sport = :{port}"], capture_output=True,
                           text=True).stdout
            if out.strip():
                return
            if proc is not None and proc.poll() is not None:
                raise LabError(f"server in {host} exited with {proc.returncode}")
            time.sleep(0.05)
        raise LabError(f"nothing listens on port {port} in {host} after {timeout} s")

    def stop(self, proc: subprocess.Popen) -> None:
        """Stop one process started by start_server()."""
        self._stop(proc)
        if proc in self.procs:
            self.procs.remove(proc)

    @staticmethod
    def _stop(p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(2)

    def sniff(self, host: str, iface: str, bpf: str | None = None) -> Sniffer:
        """An AF_PACKET capture on `iface` of `host` (see Sniffer)."""
        return Sniffer(self.ns(host), iface, bpf)

    # -- diagnostics -------------------------------------------------------------------
    def sysctl(self, host: str, key: str) -> str:
        return self.run(host, ["sysctl", "-n", key], capture_output=True, text=True).stdout.strip()

    def route_ok(self) -> list[str]:
        """Check the TCPCopy routing invariants; returns the problems found (empty = fine)."""
        problems = []
        for h in ("client", "online", "target", "assistant"):
            for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
                if self.sysctl(h, key) != "0":
                    problems.append(f"{h}: {key} is not 0")
        for net, via in ((self.client_net, self.assist_ip), (self.client_net6, self.assist_ip6)):
            fam = "-6" if ":" in net else "-4"
            out = _ip("-n", self.ns("target"), fam, "route", "show", net, check=False).stdout
            has = f"via {via}" in out
            if has == self.without_target_route:
                problems.append(f"target: route {net} via {via} "
                                + ("present" if has else "missing") + f" ({out.strip()!r})")
        for host, dev in self.interfaces():
            st = _ip("-n", self.ns(host), "-br", "link", "show", dev, check=False).stdout
            if "UP" not in st.split()[1:2] and "UNKNOWN" not in st:
                problems.append(f"{host}: {dev} not up ({st.strip()!r})")
        return problems

    def status(self) -> str:
        lines = []
        for h in HOSTS:
            ns = self.ns(h)
            if ns not in netns_list():
                lines.append(f"== {ns}: absent")
                continue
            lines.append(f"== {ns} (ip_forward={self.sysctl(h, 'net.ipv4.ip_forward')})")
            lines += ["   " + ln for ln in
                      _ip("-n", ns, "-br", "addr", check=False).stdout.splitlines()
                      if not ln.startswith("lo ")]
            lines += ["   route: " + ln for ln in
                      _ip("-n", ns, "route", check=False).stdout.splitlines()]
            lines += ["   route6: " + ln for ln in
                      _ip("-n", ns, "-6", "route", check=False).stdout.splitlines()
                      if not ln.startswith(("fe80", "multicast"))]
        return "\n".join(lines)


@atexit.register
def _cleanup_live():
    with _live_lock:
        labs = list(_live)
    for lab in labs:
        with contextlib.suppress(Exception):
            lab.down()


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python3 -m tcpcopylib.lab",
                                description="create / remove / show the namespace lab")
    sub = p.add_subparsers(dest="cmd", required=True)
    for c in ("up", "down", "status"):
        s = sub.add_parser(c)
        s.add_argument("--name", default="tclab", help="namespace prefix (default: tclab)")
        if c == "up":
            s.add_argument("--offloads", action="store_true",
                           help="keep the kernel's default veth offloads")
            s.add_argument("--without-target-route", action="store_true",
                           help="no route on the target for the client net")
        if c == "down":
            s.add_argument("--stale", action="store_true",
                           help="also remove auto-named lab namespaces of dead processes")
    a = p.parse_args(argv)
    if a.cmd == "up" and not a.offloads and shutil.which("ethtool") is None:
        print("lab: ethtool not found: veth offloads left as the kernel sets them "
              "(apt-get install ethtool to turn them off)", file=sys.stderr)
        a.offloads = True
    lab = Lab(name=a.name, **({"offloads": a.offloads,
                                "without_target_route": a.without_target_route}
                               if a.cmd == "up" else {}))
    try:
        if a.cmd == "up":
            lab.up()
            print(f"lab {a.name} up (offloads: {'kernel default' if a.offloads else 'off'}); "
                  f"namespaces: {' '.join(lab.namespaces)}")
            for prob in lab.route_ok():
                print(f"warning: {prob}", file=sys.stderr)
        elif a.cmd == "down":
            gone = delete_namespaces(lab.namespaces)
            if a.stale:
                gone += cleanup_stale()
            print(f"removed: {' '.join(gone) or 'nothing'}")
        else:
            print(lab.status())
    except LabError as e:
        print(f"lab: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
