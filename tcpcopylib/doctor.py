"""tc-doctor's checks: is this host set up for its TCPCopy role (online, target, assistant)?

Each check is a small function ``check_x(ctx) -> Check``: a verdict (ok, warn, fail, or
skip when the check does not apply or lacks an option), what was seen, the commands that fix
it on this host (``fix``, applied by ``--fix``) and advice for people (what to do elsewhere).

Every command a check runs goes through ``ctx.run(argv)``, i.e. one runner function
(``run_command`` by default), so tests feed canned ``ip route get``, ``sysctl``,
``ethtool -k``, ``iptables-save`` outputs. The few things that are not commands (root, a raw
socket, an ICMP echo, the feedback connection, the end-to-end probe) are methods of the
Context that tests replace as well.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shlex
import shutil
import subprocess

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
ROLES = ("online", "target", "assistant")
#: exit status of tc-doctor for the worst verdict
EXIT = {OK: 0, SKIP: 0, WARN: 1, FAIL: 2}

@dataclasses.dataclass
class CmdResult:
    argv: list
    rc: int
    out: str = ""
    err: str = ""


def run_command(argv, timeout: float = 5.0) -> CmdResult:
    """The one runner: run argv, capture its output; a missing program gives rc 127."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return CmdResult(list(argv), 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return CmdResult(list(argv), 124, "", f"{argv[0]}: timed out after {timeout:g} s")
    return CmdResult(list(argv), r.returncode, r.stdout, r.stderr)


@dataclasses.dataclass
class Check:
    name: str
    verdict: str
    seen: str
    fix: list = dataclasses.field(default_factory=list)   # argv lists, run on this host
    advice: str = ""

    def fix_text(self) -> list[str]:
        return [shlex.join(c) for c in self.fix]

    def to_dict(self) -> dict:
        return {"check": self.name, "verdict": self.verdict, "seen": self.seen,
                "fix": self.fix_text(), "advice": self.advice}


def worst(checks) -> str:
    order = {SKIP: 0, OK: 0, WARN: 1, FAIL: 2}
    v = OK
    for c in checks:
        if order[c.verdict] > order[v]:
            v = c.verdict
    return v


def parse_hostport(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' -> (host, port); ValueError if bad."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ipaddress.ip_address(host)  # an address, not a name: the checks compare addresses
    return host, int(port)


def sample_client(net) -> str:
    """The client address the checks use: the last host address of the client net (unlikely
    to be a real, busy client, and never the network or broadcast address)."""
    if net.num_addresses <= 2:
        return str(net[-1])
    return str(net[-2] if net.version == 4 else net[-1])


class Context:
    """What the checks need: the options, the runner, and the few non-command probes."""

    def __init__(self, role: str, target: str | None = None, assistant: str | None = None,
                 feedback: str | None = None, client_net: str | None = None,
                 iface: str | None = None, runner=run_command, key: bytes | None = None):
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        self.role = role
        self.target_ip, self.target_port = parse_hostport(target) if target else (None, None)
        self.assistant = str(ipaddress.ip_address(assistant)) if assistant else None
        self.client_net = ipaddress.ip_network(client_net, strict=False) if client_net else None
        self.client_ip = sample_client(self.client_net) if self.client_net else None
        self.feedback = feedback
        self.iface = iface
        self.key = key  # tc-feedback's shared key (feedback.load_key), as tc-session has it
        self.runner = runner
        self.euid = os.geteuid()

    # -- the seams ------------------------------------------------------------------
    def run(self, argv) -> CmdResult:
        return self.runner([str(a) for a in argv])

    def sysctl(self, key: str) -> str | None:
        r = self.run(["sysctl", "-n", key])
        return r.out.strip() if r.rc == 0 else None

    def raw_socket_ok(self) -> bool:
        import socket

        try:
            socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
            return True
        except OSError:
            return False

    def echo(self, dst: str, size: int, timeout: float = 0.5) -> bool | None:
        """An ICMP echo of `size` bytes (IP datagram) with DF set; None if it cannot be sent."""
        return icmp_echo(dst, size, timeout)

    def feedback_client(self, address: str, timeout: float = 2.0):
        """A FeedbackClient connected to tc-feedback and, where it asks, authenticated with
        the key (UnavailableError, NoPermissionError if not); for a classic: address, a
        classic.ClassicFeedbackClient (its version message sent; intercept answers none)."""
        from tcpcopylib.classic import ClassicFeedbackClient, is_classic_address
        from tcpcopylib.feedback import FeedbackClient

        c = (ClassicFeedbackClient(address, name="tc-doctor") if is_classic_address(address)
             else FeedbackClient(address, name="tc-doctor", key=self.key))
        try:
            c.connect(timeout)
        except BaseException:
            c.close()
            raise
        return c

    def feedback_header(self, address: str, timeout: float = 2.0) -> dict:
        """tc-feedback's stream header, after the authentication it asks for."""
        c = self.feedback_client(address, timeout)
        try:
            return c.server_header
        finally:
            c.close()

    def probe(self, timeout: float = 2.0) -> dict:
        return syn_probe(self, timeout)

    # -- helpers used by several checks ---------------------------------------------
    def route_get(self, dst: str, *extra) -> tuple[dict | None, str]:
        """`ip -o route get DST ...` parsed into {'type', 'via', 'dev', 'src', 'mtu'}."""
        r = self.run(["ip", "-o", "route", "get", dst, *extra])
        if r.rc != 0:
            return None, (r.err or r.out).strip()
        return parse_route_get(r.out), r.out.strip()

    def link_mtu(self, dev: str) -> int | None:
        r = self.run(["ip", "-o", "link", "show", "dev", dev])
        words = r.out.split()
        if r.rc == 0 and "mtu" in words:
            i = words.index("mtu")
            if i + 1 < len(words) and words[i + 1].isdigit():
                return int(words[i + 1])
        return None

    def iface_of(self, addr: str) -> str | None:
        """The interface that holds address `addr` on this host, if any."""
        r = self.run(["ip", "-o", "addr", "show"])
        for line in r.out.splitlines():
            w = line.split()
            if len(w) >= 4 and w[2] in ("inet", "inet6") and w[3].split("/")[0] == addr:
                return w[1].rstrip(":").split("@")[0]
        return None


def parse_route_get(text: str) -> dict:
    w = text.replace("\\", " ").split()
    d = {"type": "unicast", "via": None, "dev": None, "src": None, "mtu": None}
    if w and w[0] in ("local", "broadcast", "unreachable", "prohibit", "blackhole",
                      "multicast", "throw"):
        d["type"] = w[0]
    for key in ("via", "dev", "src", "mtu"):
        if key in w:
            i = w.index(key)
            if i + 1 < len(w):
                d[key] = w[i + 1]
    if d["via"] in ("inet", "inet6") and "via" in w:  # "via inet6 ADDR" (IPv4 via IPv6)
        d["via"] = w[w.index("via") + 2]
    if d["mtu"] == "lock":
        d["mtu"] = w[w.index("mtu") + 2]
    d["mtu"] = int(d["mtu"]) if d["mtu"] and d["mtu"].isdigit() else None
    return d


# ------------------------------------------------------------------------------------
# the checks
# ------------------------------------------------------------------------------------

def check_permission(ctx: Context) -> Check:
    """Root, or at least a raw socket (tc-emit, tc-capture, tc-intercept need one)."""
    name = "permission"
    if ctx.euid == 0:
        return Check(name, OK, "running as root")
    if ctx.role == "target":
        return Check(name, WARN, f"not root (uid {ctx.euid}): the checks work, --fix needs root",
                     advice="run tc-doctor --fix as root")
    if ctx.raw_socket_ok():
        return Check(name, OK, f"not root (uid {ctx.euid}), but raw sockets open (CAP_NET_RAW)")
    tools = "tc-capture and tc-emit" if ctx.role == "online" else "tc-intercept"
    return Check(name, FAIL, f"not root (uid {ctx.euid}) and no raw socket: {tools} will "
                 "exit with status 77",
                 advice="run as root, or give the Python interpreter CAP_NET_RAW and "
                        "CAP_NET_ADMIN (setcap cap_net_raw,cap_net_admin+ep PYTHON)")


def check_target_route(ctx: Context) -> Check:
    """On the target: replies to the client net go via the assistant (`ip route get`)."""
    name = "route to clients"
    if ctx.client_net is None:
        return Check(name, SKIP, "not checked: give --client-net CIDR")
    net, cip, asst = str(ctx.client_net), ctx.client_ip, ctx.assistant
    fix = [["ip", "route", "replace", net, "via", asst]] if asst else []
    advice = "" if asst else "give --assistant ADDR to get the fix command"
    route, text = ctx.route_get(cip)
    if route is None:
        return Check(name, FAIL, f"no route to {cip} ({text}): the target cannot answer "
                     "the replayed clients", fix, advice)
    if route["type"] != "unicast":
        return Check(name, FAIL, f"{cip} is {route['type']} here ({text}): replies never "
                     "leave for the assistant", fix, advice)
    if asst is None:
        return Check(name, WARN, f"{cip} goes {'via ' + route['via'] if route['via'] else 'direct'}"
                     f" dev {route['dev']}; give --assistant ADDR to confirm it is the assistant",
                     advice=advice)
    if route["via"] == asst:
        return Check(name, OK, f"{cip} goes via {asst} dev {route['dev']} (the assistant)")
    how = f"via {route['via']}" if route["via"] else "directly (no gateway)"
    return Check(name, FAIL, f"{cip} goes {how} dev {route['dev']}, not via the assistant "
                 f"{asst}: replies reach the real clients, which answer with RST", fix)


def check_ip_forward(ctx: Context) -> Check:
    """On the assistant: forwarding is off, so the target's replies end here."""
    name = "ip_forward"
    keys = ["net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"]
    vals = {k: ctx.sysctl(k) for k in keys}
    on = [k for k, v in vals.items() if v not in (None, "0")]
    seen = ", ".join(f"{k}={v if v is not None else '?'}" for k, v in vals.items())
    if on:
        return Check(name, FAIL, f"{seen}: the assistant forwards the target's replies to "
                     "the real clients (they answer with RST)",
                     [["sysctl", "-w", f"{k}=0"] for k in on])
    if all(v is None for v in vals.values()):
        return Check(name, WARN, "cannot read the forwarding sysctls")
    return Check(name, OK, seen)


def check_rp_filter(ctx: Context) -> Check:
    """On the target: forged client sources are not dropped by reverse-path filtering.

    The kernel decides: `ip route get TARGET from CLIENT iif IFACE` is the input route
    lookup a replayed packet gets, rp_filter included (it fails with "Invalid cross-device
    link" where rp_filter drops the packet)."""
    name = "rp_filter"
    if ctx.client_net is None or ctx.target_ip is None:
        return Check(name, SKIP, "not checked: give --target and --client-net")
    if ctx.client_net.version == 6:
        return Check(name, OK, "IPv6: no rp_filter sysctl (only netfilter's rpfilter match)")
    iface = ctx.iface or ctx.iface_of(ctx.target_ip)
    if iface is None:
        return Check(name, WARN, f"{ctx.target_ip} is not an address of this host and no "
                     "--iface given: cannot tell where replayed packets arrive",
                     advice="give --iface IFACE (the interface facing the online host)")
    vals = {k: ctx.sysctl(f"net.ipv4.conf.{k}.rp_filter") for k in ("all", iface)}
    nums = [int(v) for v in vals.values() if v is not None and v.isdigit()]
    eff = max(nums) if nums else None
    seen = f"rp_filter all={vals['all']} {iface}={vals[iface]} (in effect: {eff})"
    route, text = ctx.route_get(ctx.target_ip, "from", ctx.client_ip, "iif", iface)
    fix = [["sysctl", "-w", f"net.ipv4.conf.{k}.rp_filter=2"]
           for k, v in vals.items() if v == "1"]
    if route is not None:
        return Check(name, OK, f"{seen}; a packet from {ctx.client_ip} arriving on {iface} "
                     "is accepted")
    if "cross-device" in text or "Invalid" in text:
        back, _ = ctx.route_get(ctx.client_ip)
        via = f" (the route back leaves by {back['dev']})" if back and back["dev"] else ""
        return Check(name, FAIL, f"{seen}; the kernel drops packets from {ctx.client_ip} "
                     f"arriving on {iface}{via}: every replayed SYN is lost", fix,
                     "" if fix else "rp_filter is set elsewhere; use 2 (loose) or 0")
    return Check(name, WARN, f"{seen}; the input route lookup failed: {text}")


OFFLOAD_NAMES = {"generic-receive-offload": "gro", "large-receive-offload": "lro",
                 "tcp-segmentation-offload": "tso"}


def parse_ethtool_k(text: str) -> dict:
    """{'gro': ('on', False), ...}: state and whether it is [fixed]."""
    out = {}
    for line in text.splitlines():
        key, sep, rest = line.strip().partition(":")
        if sep and key in OFFLOAD_NAMES:
            w = rest.split()
            out[OFFLOAD_NAMES[key]] = (w[0] if w else "?", "[fixed]" in rest)
    return out


def check_offloads(ctx: Context) -> Check:
    """On the online host: GRO/LRO/TSO of the capture interface (ethtool -k)."""
    name = "offloads"
    if not ctx.iface:
        return Check(name, SKIP, "not checked: give --iface (the capture interface)")
    r = ctx.run(["ethtool", "-k", ctx.iface])
    if r.rc == 127:
        return Check(name, WARN, "ethtool not found: offloads of "
                     f"{ctx.iface} not checked (tc-capture splits GRO/LRO super-segments "
                     "back to the MTU in any case)", advice="apt-get install ethtool")
    if r.rc != 0:
        return Check(name, FAIL, f"ethtool -k {ctx.iface}: {(r.err or r.out).strip()}",
                     advice="check --iface: tc-capture needs an existing interface")
    st = parse_ethtool_k(r.out)
    seen = ", ".join(f"{k} {st[k][0]}{' [fixed]' if st[k][1] else ''}"
                     for k in ("gro", "lro", "tso") if k in st)
    merging = [k for k in ("gro", "lro") if k in st and st[k][0] == "on" and not st[k][1]]
    if merging:
        return Check(name, OK, f"{ctx.iface}: {seen}; tc-capture splits the merged "
                     "super-segments back to the MTU (counted as supersegs in --stats); TSO "
                     "only shapes what this host sends",
                     advice="to capture what is on the wire (and save that CPU): "
                            f"ethtool -K {ctx.iface} {' '.join(f'{k} off' for k in merging)}")
    return Check(name, OK, f"{ctx.iface}: {seen}; the capture sees wire-sized segments")


# -- firewall ---------------------------------------------------------------------------

def _in_net(value: str | None, addr: str | None) -> bool:
    """Does the rule's address match (value None = any) cover addr (None = any)?"""
    if value is None or addr is None:
        return True
    try:
        net = ipaddress.ip_network(value, strict=False)
        if isinstance(addr, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            return net.version == addr.version and net.overlaps(addr)
        return ipaddress.ip_address(addr) in net
    except ValueError:
        return True


def _port_in(spec: str | None, port: int) -> bool:
    if spec is None:
        return True
    for part in spec.split(","):
        lo, _, hi = part.partition(":")
        try:
            if int(lo or 0) <= port <= int(hi or lo or 65535):
                return True
        except ValueError:
            return True
    return False


def parse_iptables_save(text: str) -> dict:
    """{table: {'policy': {chain: policy}, 'rules': {chain: [tokens after '-A CHAIN']}}}"""
    tables, cur = {}, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("*"):
            cur = tables.setdefault(line[1:], {"policy": {}, "rules": {}})
        elif cur is None or not line or line.startswith("#"):
            continue
        elif line.startswith(":"):
            w = line[1:].split()
            cur["policy"][w[0]] = w[1] if len(w) > 1 else "-"
            cur["rules"].setdefault(w[0], [])
        elif line.startswith("-A "):
            w = shlex.split(line)
            cur["rules"].setdefault(w[1], []).append(w[2:])
    return tables


def _rule_matches(tok: list, port: int, src, dst) -> bool | None:
    """True/False if the rule certainly does/doesn't match a replayed packet to the target
    port; None when it cannot tell (negations, states, marks ...): treated as no match."""
    opts, i = {}, 0
    while i < len(tok):
        t = tok[i]
        if t == "!":
            return None
        if t.startswith("-") and i + 1 < len(tok) and not tok[i + 1].startswith("-"):
            opts[t] = tok[i + 1]
            i += 2
        else:
            opts[t] = True
            i += 1
    if any(k in opts for k in ("--state", "--ctstate", "--mark", "--uid-owner", "--tcp-flags",
                               "--syn", "--src-range", "--dst-range", "--match-set")):
        return None
    proto = opts.get("-p")
    if proto not in (None, "tcp", "6", "all"):
        return False
    if not _port_in(opts.get("--dport") or opts.get("--dports"), port):
        return False
    return _in_net(opts.get("-s"), src) and _in_net(opts.get("-d"), dst)


def iptables_verdict(tables: dict, chain: str, port: int, src, dst, depth: int = 0):
    """(verdict, tokens of the deciding rule, chain) for a replayed packet in filter/chain."""
    flt = tables.get("filter")
    if flt is None or depth > 8:
        return "ACCEPT", None, chain
    for tok in flt["rules"].get(chain, []):
        if _rule_matches(tok, port, src, dst) is not True:
            continue
        j = tok[tok.index("-j") + 1] if "-j" in tok and tok.index("-j") + 1 < len(tok) else None
        if j in ("ACCEPT", "DROP", "REJECT"):
            return j, tok, chain
        if j == "RETURN":
            return None, None, chain
        if j in flt["rules"]:
            v = iptables_verdict(tables, j, port, src, dst, depth + 1)
            if v[0] is not None:
                return v
    if depth:
        return None, None, chain
    return flt["policy"].get(chain, "ACCEPT"), None, chain


def _nft_rule_matches(w: list, port: int) -> bool | None:
    """Does an nft rule (its words) match a TCP packet to `port`? None: too specific to
    judge here (addresses, interfaces, conntrack state, marks ...)."""
    if "dport" in w:
        spec = w[w.index("dport") + 1].strip("{},")
        return _port_in(spec.replace("-", ":"), port)
    if any(x in w for x in ("saddr", "daddr", "sport", "ct", "iifname", "oifname", "iif",
                            "oif", "meta", "mark", "icmp", "udp", "@th")):
        return None
    return True


def parse_nft(text: str, hook: str, port: int) -> list[dict]:
    """Rules of `nft -a list ruleset` in base chains of `hook` that drop or reject a TCP
    packet to `port` (bare verdicts, or with a matching `dport`) before any rule accepts
    it, and drop policies of such chains with no rule accepting it."""
    found, table, chain, chain_hook = [], None, None, None
    accepted, policy_drop = False, False

    def end_chain():
        if chain and chain_hook == hook and policy_drop and not accepted:
            found.append({"table": table, "chain": chain, "rule": "policy drop",
                          "handle": None})

    for line in text.splitlines():
        s = line.strip()
        w = s.split()
        if s.startswith("table "):
            end_chain()
            table, chain, chain_hook = (w[1], w[2]), None, None
        elif s.startswith("chain ") and table:
            end_chain()
            chain, chain_hook, accepted, policy_drop = w[1], None, False, False
        elif s.startswith("type ") and " hook " in s and chain:
            chain_hook = w[w.index("hook") + 1].rstrip(";")
            policy_drop = "policy drop" in s
        elif chain and chain_hook == hook and not accepted:
            body, _, handle = s.partition(" # handle ")
            if _nft_rule_matches(w, port) is not True:
                continue
            if "accept" in w:
                accepted = True
            elif "drop" in w or "reject" in w:
                found.append({"table": table, "chain": chain, "rule": body,
                              "handle": handle.strip() or None})
                accepted = True  # the first verdict decides
    end_chain()
    return found


def check_firewall(ctx: Context) -> Check:
    """iptables (INPUT on the target, OUTPUT on the online host) and nftables rules that
    would drop or reset the replayed connections."""
    name = "firewall"
    if ctx.target_port is None:
        return Check(name, SKIP, "not checked: give --target HOST:PORT")
    chain, hook = ("INPUT", "input") if ctx.role == "target" else ("OUTPUT", "output")
    port, dst, src = ctx.target_port, ctx.target_ip, ctx.client_net
    v6 = ipaddress.ip_address(dst).version == 6
    save = "ip6tables-save" if v6 else "iptables-save"
    cmd = "ip6tables" if v6 else "iptables"
    problems, fix, seen, tools = [], [], [], 0
    r = ctx.run([save, "-t", "filter"])
    covered = False
    if r.rc == 0:
        tools += 1
        covered = True
        verdict, tok, where = iptables_verdict(parse_iptables_save(r.out), chain, port, src, dst)
        if verdict in ("DROP", "REJECT") and tok is not None:
            how = "resets" if "tcp-reset" in tok else "rejects" if verdict == "REJECT" else \
                "drops"
            problems.append(f"{cmd} {where} rule '{shlex.join(tok)}' {how} packets to "
                            f"{dst}:{port}")
            fix.append([cmd, "-t", "filter", "-D", where, *tok])
        elif verdict == "DROP":
            problems.append(f"{cmd} {chain} policy DROP and no rule accepts tcp port {port}")
            fix.append([cmd, "-t", "filter", "-I", chain, "-p", "tcp", "-d", dst,
                        "--dport", str(port), "-j", "ACCEPT"])
        else:
            seen.append(f"{cmd} {chain}: {dst}:{port} accepted")
    elif r.rc != 127:
        seen.append(f"{save}: {(r.err or r.out).strip()[:120]}")
    r = ctx.run(["nft", "-a", "list", "ruleset"])
    if r.rc == 0:
        tools += 1
        hits = parse_nft(r.out, hook, port)
        for h in hits:
            fam, tname = h["table"]
            if covered and tname in ("filter",) and fam in ("ip", "ip6"):
                continue  # iptables-nft's own table: judged above from iptables-save
            problems.append(f"nft {fam} {tname} chain {h['chain']}: '{h['rule']}' may drop "
                            f"packets to port {port}")
            if h["handle"]:
                fix.append(["nft", "delete", "rule", fam, tname, h["chain"], "handle",
                            h["handle"]])
        if not hits:
            seen.append(f"nft {hook} hooks: nothing drops port {port}")
    if tools == 0:
        return Check(name, SKIP, "neither iptables-save nor nft is installed: rules not "
                     "checked")
    if problems:
        return Check(name, FAIL, "; ".join(problems), fix)
    return Check(name, OK, "; ".join(seen) or "no rule drops the replayed packets")


def check_listening(ctx: Context) -> Check:
    """On the target: something listens on the target port."""
    name = "listening"
    if ctx.target_port is None:
        return Check(name, SKIP, "not checked: give --target HOST:PORT")
    r = ctx.run(["ss", "-Htln", f"sport = :{ctx.target_port}"])
    if r.rc != 0:
        return Check(name, WARN, f"ss: {(r.err or r.out).strip()}")
    if r.out.strip():
        return Check(name, OK, f"a server listens on port {ctx.target_port}")
    return Check(name, WARN, f"nothing listens on port {ctx.target_port}: every replayed "
                 "session will end reset_by_target", advice="start the service under test")


def check_online_route(ctx: Context) -> Check:
    """On the online host: tc-emit has a route to the target."""
    name = "route to target"
    if ctx.target_ip is None:
        return Check(name, SKIP, "not checked: give --target HOST:PORT")
    route, text = ctx.route_get(ctx.target_ip)
    if route is None:
        return Check(name, FAIL, f"no route to {ctx.target_ip}: {text}")
    if route["type"] == "local":
        return Check(name, FAIL, f"{ctx.target_ip} is an address of this host: replayed "
                     "packets would not leave it (use the namespace lab for one machine)")
    return Check(name, OK, f"{ctx.target_ip} via {route['via'] or 'direct'} dev {route['dev']}")


def path_mtu(ctx: Context, dst: str, size: int) -> tuple[int | None, str]:
    """(largest size up to `size` that gets an echo reply with DF set, note). None: unknown."""
    ok = ctx.echo(dst, size)
    if ok is None:
        return None, "cannot send ICMP echo (needs root)"
    if ok:
        return size, ""
    if not ctx.echo(dst, 84):
        return None, f"{dst} does not answer ICMP echo"
    lo, hi = 84, size   # lo answers, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ctx.echo(dst, mid):
            lo = mid
        else:
            hi = mid
    return lo, ""


def check_mtu(ctx: Context) -> Check:
    """MTU along the path: online -> target (captured segments), target -> assistant
    (replies)."""
    name = "mtu"
    if ctx.role == "online":
        if ctx.target_ip is None:
            return Check(name, SKIP, "not checked: give --target HOST:PORT")
        route, text = ctx.route_get(ctx.target_ip)
        if route is None or route["type"] != "unicast":
            return Check(name, SKIP, f"no route to {ctx.target_ip}")
        emit = route["mtu"] or ctx.link_mtu(route["dev"])
        cap = ctx.link_mtu(ctx.iface) if ctx.iface else None
        seen = f"route to {ctx.target_ip}: dev {route['dev']} mtu {emit}" + (
            f"; capture {ctx.iface} mtu {cap}" if cap else "")
        if cap and emit and cap > emit:
            return Check(name, FAIL, f"{seen}: captured segments of up to {cap} bytes do not "
                         f"fit the {emit}-byte path (tc-emit: Message too long)",
                         advice=f"tc-capture {ctx.iface} --mtu {emit}")
        size = min(x for x in (cap, emit) if x) if (cap or emit) else 1500
        pm, note = path_mtu(ctx, ctx.target_ip, size)
        if pm is None:
            return Check(name, WARN if "answer" in note else SKIP,
                         f"{seen}; path not measured: {note}")
        if pm < size:
            return Check(name, FAIL, f"{seen}; but only {pm}-byte packets reach "
                         f"{ctx.target_ip} (DF echo): larger captured segments are lost",
                         advice=f"make the MTUs on the path equal, or split smaller: "
                                f"tc-capture {ctx.iface or 'IFACE'} --mtu {pm}")
        return Check(name, OK, f"{seen}; {size}-byte packets reach {ctx.target_ip}")
    if ctx.role == "target":
        if ctx.client_net is None or ctx.assistant is None:
            return Check(name, SKIP, "not checked: give --client-net and --assistant")
        route, _ = ctx.route_get(ctx.client_ip)
        if route is None or route["type"] != "unicast":
            return Check(name, SKIP, f"no route to {ctx.client_ip} (see the route check)")
        size = route["mtu"] or ctx.link_mtu(route["dev"]) or 1500
        seen = f"replies to {ctx.client_net} leave dev {route['dev']} with mtu {size}"
        pm, note = path_mtu(ctx, ctx.assistant, size)
        if pm is None:
            return Check(name, WARN if "answer" in note else SKIP,
                         f"{seen}; path not measured: {note}")
        if pm < size:
            return Check(name, FAIL, f"{seen}, but only {pm}-byte packets reach the "
                         f"assistant {ctx.assistant}: larger replies are lost (sessions stall)",
                         [["ip", "route", "replace", str(ctx.client_net), "via", ctx.assistant,
                           "mtu", "lock", str(pm)]],
                         advice="or make the assistant's MTU equal to the target's")
        return Check(name, OK, f"{seen}; {size}-byte packets reach the assistant")
    return Check(name, SKIP, "measured from the online host and the target")


def check_feedback(ctx: Context) -> Check:
    """The feedback channel answers with a tc-feedback stream header and, beyond loopback
    and Unix sockets, proves the shared key (an open channel lets anyone claim sessions)."""
    from tcpcopylib.errors import NoPermissionError
    from tcpcopylib.feedback import ENV_KEY_FILE, on_loopback, parse_address

    name = "feedback"
    addr = ctx.feedback or os.environ.get("TC_FEEDBACK")
    if not addr:
        return Check(name, SKIP, "not checked: give --feedback ADDR (as tc-session gets it)")
    if addr.startswith("classic:"):  # intercept 1.0's protocol: no header, no key
        try:
            ctx.feedback_client(addr).close()
        except Exception as e:  # noqa: BLE001 - any failure to connect is the finding
            return Check(name, FAIL, f"{addr}: {e}",
                         advice="start intercept (or tc-intercept IFACE -F 'tcp and src "
                                "port PORT' | tc-feedback --classic --allow THIS_HOST) on "
                                "the assistant; open port 36524 in any firewall between")
        return Check(name, OK, f"{addr} accepts a classic connection (intercept's protocol "
                     "has no answer to check and no key; the SYN probe shows the replies)")
    try:
        hdr = ctx.feedback_header(addr)
    except NoPermissionError as e:
        return Check(name, FAIL, f"{addr}: {e}",
                     advice=f"give tc-doctor the key tc-session uses (--key FILE or "
                            f"${ENV_KEY_FILE}), the same file as tc-feedback --key")
    except Exception as e:  # noqa: BLE001 - any failure to connect is the finding
        where = "on the assistant" if ctx.role == "online" else "here"
        return Check(name, FAIL, f"{addr}: {e}",
                     advice=f"start tc-intercept IFACE -F 'tcp and src port PORT' | "
                            f"tc-feedback --listen tcp::36524 {where}; open the port in "
                            "any firewall between")
    desc = f"{hdr.get('tool', '?')} {hdr.get('tool_version', '?')}, format v{hdr.get('v')}"
    if hdr.get("auth"):
        return Check(name, OK, f"{addr} answers: {desc}; key proved both ways "
                     f"({hdr['auth']})")
    if not on_loopback(*parse_address(addr)):
        return Check(name, WARN, f"{addr} answers: {desc}; without a key: anyone who can "
                     "reach it can take replayed connections and read the target's replies",
                     advice="make a key (head -c 32 /dev/urandom | base64 > KEY; chmod 600 "
                            "KEY) and start tc-feedback, tc-session and tc-doctor with "
                            "--key KEY")
    return Check(name, OK, f"{addr} answers: {desc} (loopback or Unix socket: no key needed)")


def check_assistant_addr(ctx: Context) -> Check:
    """On the assistant: --assistant is one of this host's addresses."""
    name = "assistant address"
    if ctx.assistant is None:
        return Check(name, SKIP, "not checked: give --assistant ADDR")
    dev = ctx.iface_of(ctx.assistant)
    if dev is None:
        return Check(name, FAIL, f"{ctx.assistant} is not an address of this host: the "
                     "target's replies are routed elsewhere")
    return Check(name, OK, f"{ctx.assistant} is on {dev} (run tc-intercept {dev})")


def check_probe(ctx: Context) -> Check:
    """End to end: a forged SYN to the target; its SYN-ACK must reach the assistant (seen
    through tc-feedback) and must not come back to this (online) host."""
    name = "probe"
    if ctx.role != "online":
        return Check(name, SKIP, "the probe runs on the online host (--role online)")
    if ctx.target_ip is None or ctx.client_net is None:
        return Check(name, SKIP, "not run: give --target and --client-net")
    try:
        res = ctx.probe()
    except Exception as e:  # noqa: BLE001
        return Check(name, FAIL, f"probe failed: {type(e).__name__}: {e}")
    what = f"SYN {ctx.client_ip}:{res['sport']} > {ctx.target_ip}:{ctx.target_port}"
    if res["here"]:
        return Check(name, FAIL, f"{what}: the SYN-ACK came back to this host, so real "
                     "clients receive the target's replies (check the target's route)")
    if res["feedback"] is None:
        return Check(name, WARN, f"{what}: no SYN-ACK here (good); give --feedback to see it "
                     "arrive at the assistant")
    if res.get("rst") and not res["feedback"]:
        return Check(name, FAIL, f"{what}: the target answered RST (it reached the assistant): "
                     f"nothing listens on port {ctx.target_port}, or a firewall resets",
                     advice="run tc-doctor --role target there")
    if res["feedback"]:
        return Check(name, OK, f"{what}: SYN-ACK reached the assistant "
                     f"({res['ms']:.0f} ms, via tc-feedback) and not this host")
    return Check(name, FAIL, f"{what}: no SYN-ACK through tc-feedback within "
                 f"{res['timeout']:g} s (target route, rp_filter, firewall, tc-intercept's "
                 "filter?)")


ROLE_CHECKS = {
    "online": [check_permission, check_online_route, check_offloads, check_firewall,
               check_mtu, check_feedback],
    "target": [check_permission, check_target_route, check_rp_filter, check_firewall,
               check_listening, check_mtu],
    "assistant": [check_permission, check_assistant_addr, check_ip_forward, check_feedback],
}


def role_checks(role: str, probe: bool = False) -> list:
    """The check functions of a role, in the order they run (and are fixed)."""
    checks = list(ROLE_CHECKS[role])
    if probe:
        checks.append(check_probe)
    return checks


def run_checks(ctx: Context, probe: bool = False) -> list[Check]:
    return [safe(fn, ctx) for fn in role_checks(ctx.role, probe)]


def safe(fn, ctx) -> Check:
    try:
        return fn(ctx)
    except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
        return Check(fn.__name__.removeprefix("check_"), WARN,
                     f"the check itself failed: {type(e).__name__}: {e}")


def format_text(checks) -> str:
    lines = []
    for c in checks:
        lines.append(f"{c.verdict.upper():<5} {c.name}: {c.seen}")
        for f in c.fix_text():
            lines.append(f"      fix: {f}")
        if c.advice:
            lines.append(f"      hint: {c.advice}")
    return "\n".join(lines)


def fix_all(ctx: Context, fns, yes: bool, ask, say=None) -> list[dict]:
    """--fix: the fix commands of the checks ``fns`` that fail, each applied when ``yes`` or
    ask(prompt) says so; one dict per command (check, command, applied, rc, error or
    skipped). ``say(text)``: progress for a person (None: quiet, as with --json)."""
    import shlex

    fixes = []
    for fn in fns:
        # each check runs again just before its fix: an earlier fix may have mended it
        # (rp_filter after the route), or made it checkable (mtu after the route)
        c = safe(fn, ctx)
        if c.verdict in (OK, SKIP) or not c.fix:
            continue
        for cmd in c.fix:
            text = shlex.join(cmd)
            rec = {"check": c.name, "command": text, "applied": False}
            fixes.append(rec)
            if say:
                say(f"fix ({c.name}): {text}")
            if not yes and not ask(f"apply `{text}`? [y/N] "):
                rec["skipped"] = "not confirmed"
                if say:
                    say("      not applied")
                continue
            r = ctx.run(cmd)
            rec.update(applied=r.rc == 0, rc=r.rc, error=(r.err or "").strip())
            if say:
                say("      done" if r.rc == 0 else f"      failed ({r.rc}): {r.err.strip()}")
    return fixes


def ask_on_tty(prompt: str, tty=None, warn=print) -> bool:
    """A yes/no question on ``tty`` (a file object; default /dev/tty, opened here)."""
    try:
        f = tty or open("/dev/tty", "r+")
    except OSError:
        warn("no terminal to ask on: fix not applied (use --fix --yes)")
        return False
    try:
        f.write(prompt)
        f.flush()
        return f.readline().strip().lower() in ("y", "yes")
    finally:
        if f is not tty:
            f.close()


# ------------------------------------------------------------------------------------
# the non-command probes
# ------------------------------------------------------------------------------------

def icmp_echo(dst: str, size: int, timeout: float = 0.5) -> bool | None:
    """Send one ICMP (or ICMPv6) echo request of `size` bytes, IP header included, that must
    not be fragmented; True if the reply came, None if it cannot be sent (not root)."""
    import select
    import socket
    import struct
    import time

    from tcpcopylib.packet import checksum

    v6 = ":" in dst
    try:
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_RAW,
                          socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP)
    except OSError:
        return None
    with s:
        if v6:
            s.setsockopt(socket.IPPROTO_IPV6, 62, 1)  # IPV6_DONTFRAG
            s.setsockopt(socket.IPPROTO_IPV6, 23, 2)  # IPV6_MTU_DISCOVER = PMTUDISC_DO
        else:
            s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: DF
        ident = (os.getpid() ^ size) & 0xFFFF
        payload = bytes(max(0, size - (48 if v6 else 28)))
        kind, reply = (128, 129) if v6 else (8, 0)
        hdr = struct.pack("!BBHHH", kind, 0, 0, ident, 1)
        csum = 0 if v6 else checksum(hdr + payload)  # the kernel sums ICMPv6 itself
        pkt = struct.pack("!BBHHH", kind, 0, csum, ident, 1) + payload
        try:
            s.sendto(pkt, (dst, 0))
        except OSError:
            return False  # EMSGSIZE: larger than the local route's MTU
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([s], [], [], left)[0]:
                return False
            data, addr = s.recvfrom(65535)
            off = 0 if v6 else (data[0] & 15) * 4  # raw ICMPv6 sockets get no IP header
            if addr[0] == dst and len(data) >= off + 8 and data[off] == reply and \
                    struct.unpack_from("!H", data, off + 4)[0] == ident:
                return True


def syn_probe(ctx: Context, timeout: float = 2.0) -> dict:
    """Send one forged SYN from ctx.client_ip to the target and watch for its SYN-ACK here
    (a packet socket on every interface) and at the assistant (through tc-feedback)."""
    import random
    import select
    import socket
    import time

    from tcpcopylib.packet import TH_RST, TH_SYN, build_tcp

    fam = socket.AF_INET6 if ":" in ctx.target_ip else socket.AF_INET
    cip, tip = socket.inet_pton(fam, ctx.client_ip), socket.inet_pton(fam, ctx.target_ip)
    sport, isn = random.randint(40000, 60999), random.getrandbits(32)
    res = {"sport": sport, "here": False, "feedback": None, "timeout": timeout, "ms": 0.0}
    fb = None
    addr = ctx.feedback or os.environ.get("TC_FEEDBACK")
    if addr:
        fb = ctx.feedback_client(addr)
        fb.claim(cip, sport, tip, ctx.target_port)
        fb.flush()
        res["feedback"] = False
    eth_p = 0x86DD if fam == socket.AF_INET6 else 0x0800
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(eth_p))
    raw = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        time.sleep(0.05)  # let the claim arrive before the SYN-ACK can
        raw.sendto(build_tcp(cip, tip, sport, ctx.target_port, isn, 0, TH_SYN),
                   (ctx.target_ip, 0))
        t0 = time.monotonic()
        deadline = t0 + timeout
        socks = [sniff] + ([fb] if fb else [])
        while time.monotonic() < deadline and not res["feedback"]:
            r, _, _ = select.select(socks, [], [], max(0.0, deadline - time.monotonic()))
            if sniff in r:
                while True:
                    try:
                        d = sniff.recv(65535, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    if _is_synack(d, tip, cip, ctx.target_port, sport):
                        res["here"] = True
            if fb is not None and fb in r:
                for data, _ in fb.read_replies():
                    flags = _flags_of(data, tip, cip, ctx.target_port, sport)
                    if flags is not None and flags & 0x12 == 0x12:
                        res["feedback"] = True
                        res["ms"] = (time.monotonic() - t0) * 1000
                    elif flags is not None and flags & TH_RST:
                        res["rst"] = True
                        deadline = time.monotonic()  # the answer is in
        if fb is not None and res["feedback"]:
            # a short wait for a copy of the SYN-ACK here, which must not come
            r, _, _ = select.select([sniff], [], [], 0.2)
            while r:
                try:
                    d = sniff.recv(65535, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if _is_synack(d, tip, cip, ctx.target_port, sport):
                    res["here"] = True
        # leave no half-open connection on the target
        raw.sendto(build_tcp(cip, tip, sport, ctx.target_port, isn + 1, 0, TH_RST),
                   (ctx.target_ip, 0))
    finally:
        sniff.close()
        raw.close()
        if fb is not None:
            fb.close()
    return res


def _flags_of(d: bytes, src: bytes, dst: bytes, sport: int, dport: int) -> int | None:
    """The TCP flags of datagram d if it goes src:sport -> dst:dport, else None."""
    from tcpcopylib.packet import parse_tcp

    t = parse_tcp(d)
    return t.flags if t is not None and t.key() == (src, sport, dst, dport) else None


def _is_synack(d: bytes, src: bytes, dst: bytes, sport: int, dport: int) -> bool:
    f = _flags_of(d, src, dst, sport, dport)
    return f is not None and f & 0x12 == 0x12


# ------------------------------------------------------------------------------------
# what the demo (and any lab user) needs on this machine
# ------------------------------------------------------------------------------------

def check_programs(required=("ip", "ss", "sysctl"), optional=("ethtool",),
                   which=shutil.which) -> list[Check]:
    """Commands a lab run uses: a missing required one fails, a missing optional one warns."""
    out = []
    for prog in required:
        out.append(Check(f"program {prog}", OK, which(prog)) if which(prog) else
                   Check(f"program {prog}", FAIL, f"{prog} not found",
                         advice="apt-get install iproute2 procps"))
    notes = {"ethtool": "veth offloads are left as the kernel sets them (tc-capture splits "
                        "super-segments itself)"}
    for prog in optional:
        out.append(Check(f"program {prog}", OK, which(prog)) if which(prog) else
                   Check(f"program {prog}", WARN, f"{prog} not found: "
                         f"{notes.get(prog, 'some checks are skipped')}",
                         advice=f"apt-get install {prog}"))
    return out
