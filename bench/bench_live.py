#!/usr/bin/env python3
"""Live replay benchmark: the whole live pipeline under real HTTP client load.

    python3 bench/bench_live.py [--rates 500,1000,2000,3000] [--duration 10] [--conns 20]
                                [--close] [--client wrk|python] [--offloads]
                                [--forms pipe,send,one,c] [--assistant pipe|one] [--repeat N]

For each rate R, in a fresh namespace lab:

  client:    wrk (a Lua delay() paces each of --conns keep-alive connections to R/conns
             requests/s; --close: every request on a new connection) or, without wrk, the
             checking client tests/servers/live_http_client.py --rate R (threads)
  online:    nginx :8080, and tc-capture cli0 | tc-session --target T | tc-pace | tc-emit
  assistant: tc-intercept lan0 -F 'tcp and src port 8080' | tc-feedback --listen unix:SOCK
             (--assistant one: tc-feedback --capture lan0 ..., one process)
  target:    nginx :8080

and prints the client's requests/s, completion % (requests in the target's access log over
requests in the online server's), the kernel drops of both captures (tc-capture on cli0,
tc-intercept on the assistant), tc-session's failed sessions, and the CPU each tool used
during the run (% of one core). --nice N runs the tools at nice N (the client and servers
share the same cores in the lab). Needs root; every step is bounded.

--forms pipe,send runs each rate in both forms of the online pipeline, alternating (--repeat
N times each): "pipe" is `tc-session | tc-pace | tc-emit`, "send" is `tc-session --send`
(the same packets sent from tc-session's process), "one" is `tc-session --capture cli0
--send` (no tc-capture either: the online host's work in one process); each run also prints the online host's
CPU (capture + session [+ pace + emit], user and system) per replayed session and per
request, and the assistant's (tc-intercept + tc-feedback, or C's intercept), and at the end
the mean of each form and their ratios.

--forms ...,c adds C TCPCopy in the same lab and the same run: `tcpcopy -x PORT-TARGET:PORT
-s ASSISTANT` on the online host and `intercept -i lan0 -F 'tcp and src port PORT'` on the
assistant, from binaries you built yourself (--c-tcpcopy, --c-intercept: paths; this script
neither fetches nor builds them). Its online CPU is tcpcopy's, and the ratios printed at the
end are ours over its, per session (--close) or per request.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import bench_session  # same directory: NGINX_CONF

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import replay_harness as h  # noqa: E402
from tcpcopylib.lab import Lab  # noqa: E402

PORT = 8080
TOOLS = ("tc-capture", "tc-session", "tc-pace", "tc-emit", "tc-intercept", "tc-feedback",
         "tcpcopy", "intercept")
CLK = 100  # USER_HZ

WRK_LUA = """\
local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "0")
function delay() return delay_ms end
"""


def start_nginx(lab, host, workdir):
    d = Path(workdir) / f"nginx-{host}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "nginx.conf").write_text(bench_session.NGINX_CONF.format(d=d, port=PORT))
    srv = lab.start_server(host, ["nginx", "-c", d / "nginx.conf", "-p", d], port=PORT,
                           timeout=10)
    return srv, d / "access.log"


ONLINE = ("tc-capture", "tc-session", "tc-pace", "tc-emit", "tcpcopy")  # online host's stages
ASSISTANT = ("tc-intercept", "tc-feedback", "intercept")  # the assistant's


def cpu_split(pid) -> tuple[int, int]:
    """(utime, stime) of a process, in ticks."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(f[11]), int(f[12])


def switches(pid) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of a process so far: its wake-ups, and the
    times it was preempted (each costs a Python process more than its own work)."""
    try:
        st = dict(ln.split(":\t") for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if "ctxt_switches" in ln)
    except OSError:
        return 0, 0
    return int(st["voluntary_ctxt_switches"]), int(st["nonvoluntary_ctxt_switches"])


def cpu_ticks(pid) -> int:
    return sum(cpu_split(pid))


def run_client(lab, a, rate, workdir) -> dict:
    url_host = f"{lab.online_cli_ip}:{PORT}"
    if a.client == "wrk":
        lua = Path(workdir) / "rate.lua"
        lua.write_text(WRK_LUA)
        delay_ms = max(0, round(a.conns * 1000 / rate))
        argv = ["env", f"WRK_DELAY_MS={delay_ms}", "wrk", "-t", "1", "-c", a.conns,
                "-d", f"{a.duration}s", "--timeout", "5s", "-s", lua]
        if a.close:
            argv += ["-H", "Connection: close"]
        r = lab.run("client", [*argv, f"http://{url_host}/"], capture_output=True, text=True,
                    timeout=a.duration + 60)
        m = re.search(r"(\d+) requests in ([\d.]+)s", r.stdout)
        errs = re.search(r"Socket errors: (.*)", r.stdout)
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
        return {"requests": int(m.group(1)) if m else 0,
                "rps": float(m.group(1)) / float(m.group(2)) if m else 0.0,
                "errors": (errs.group(1) if errs else "") + (
                    f" non-2xx {non2xx.group(1)}" if non2xx else ""),
                "rc": r.returncode}
    requests = 1 if a.close else 50
    r = lab.run("client", [h.PY, h.SERVERS / "live_http_client.py", "--server", url_host,
                           "--rate", rate, "--duration", a.duration, "--parallel", a.conns,
                           "--requests", requests, "--status-only"], capture_output=True, text=True,
                timeout=a.duration + 60)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {"requests": res["requests"], "rps": res["requests"] / max(res["elapsed"], 1e-9),
            "errors": f"{res['n_errors']} ({res['errors'][:1]})" if res["n_errors"] else "",
            "rc": r.returncode}


def count_lines(path) -> int:
    p = Path(path)
    return sum(1 for _ in p.open()) if p.exists() else 0


def wait_target_quiet(log, least=1.5, quiet=2.5, most=20.0) -> None:
    """After the client's end: wait until the target's access log has not grown for
    ``quiet`` seconds (``least`` at least, ``most`` at most), so that a replay running
    behind under load is measured on what it delivers, not cut at a fixed moment. (nginx
    writes the log at least once a second: flush=1s in bench_session.NGINX_CONF.)"""
    t0 = time.monotonic()
    size, still = -1, t0
    while True:
        now = time.monotonic()
        p = Path(log)
        n = p.stat().st_size if p.exists() else 0
        if n != size:
            size, still = n, now
        if now - t0 >= most or (now - t0 >= least and now - still >= quiet):
            return
        time.sleep(0.1)


def kernel_drops(live) -> str:
    if isinstance(live, CTcpcopy):
        return "-"
    cap = live.capture_counts()
    assistant = live.procs.get("tc-intercept") or live.procs["tc-feedback"]  # (its capture)
    m = re.search(r"(\d+) dropped(?:,| by)", assistant.stderr)
    shed = cap.get("sessions shed")
    return (f"{cap.get('dropped by kernel', '?')}+{cap.get('dropped by interface', '?')}"
            f"/{m.group(1) if m else '?'}" + (f" shed {shed}" if shed else ""))


class CTcpcopy:
    """C TCPCopy in the lab, shaped like the harness's Live for run_rate: intercept on the
    assistant, tcpcopy on the online host (user-built binaries; see --c-tcpcopy)."""

    def __init__(self, lab, a, workdir):
        self.procs = {
            "intercept": h.Proc(lab, "assistant", [a.c_intercept, "-i", lab.assist_if, "-F",
                                                   f"tcp and src port {PORT}",
                                                   "-l", f"{workdir}/intercept.log"]),
        }
        time.sleep(1.0)  # intercept listens on 36524 before tcpcopy connects to it
        self.procs["tcpcopy"] = h.Proc(lab, "online", [
            a.c_tcpcopy, "-x", f"{PORT}-{lab.target_ip}:{PORT}", "-s", lab.assist_ip,
            "-l", f"{workdir}/tcpcopy.log"])
        time.sleep(1.0)
        self.stats = None
        for n, p in self.procs.items():
            if p.p.poll() is not None:
                raise RuntimeError(f"{n} exited at start: {p.stderr[-500:]}")

    def stop(self):
        for p in self.procs.values():
            p.stop(timeout=5)

    def rc(self, name):
        return self.procs[name].p.returncode


def run_rate(a, rate, workdir, form="pipe") -> dict:
    with Lab(offloads=a.offloads) as lab:
        onl, onl_log = start_nginx(lab, "online", workdir)
        tgt, tgt_log = start_nginx(lab, "target", workdir)
        if form == "c":
            live = CTcpcopy(lab, a, workdir)
        else:
            live = h.start_live(lab, Path(workdir) / "live", port=PORT,
                                capture_args=a.capture_arg, session_args=a.session_arg,
                                intercept_args=a.intercept_arg,
                                send={"send": True, "one": "capture"}.get(form, False),
                                feedback="capture" if a.assistant == "one" else True)
        try:
            pids = {n: live.procs[n].pid for n in TOOLS if n in live.procs}
            for pid in pids.values() if a.nice else ():
                os.setpriority(os.PRIO_PROCESS, pid, a.nice)
            cpu0 = {n: cpu_split(p) for n, p in pids.items()}
            sw0 = {n: switches(p) for n, p in pids.items()}
            t0 = time.monotonic()
            client = run_client(lab, a, rate, workdir)
            wait_target_quiet(tgt_log)  # the last replies and FINs, a replay behind
            wall = time.monotonic() - t0
            used = {n: tuple(x1 - x0 for x1, x0 in zip(cpu_split(p), cpu0[n]))
                    for n, p in pids.items()}
            sw = {n: tuple(x1 - x0 for x1, x0 in zip(switches(p), sw0[n]))
                  for n, p in pids.items()}
            cpu = {n: sum(used[n]) / CLK / wall * 100 for n in used}
        finally:
            live.stop()
        lab.stop(onl)  # nginx flushes its access log on exit
        lab.stop(tgt)
        online_n, target_n = count_lines(onl_log), count_lines(tgt_log)
    st = live.stats or {}
    if form == "c":  # tcpcopy reports no session count: one per request with --close
        st = {"sessions": online_n if a.close else st.get("sessions", 0)}
    failed = {k: v for k, v in st.get("outcomes", {}).items()
              if v and k not in ("completed", "reconnected")}
    user = sum(used[n][0] for n in ONLINE if n in used) / CLK
    system = sum(used[n][1] for n in ONLINE if n in used) / CLK
    assistant = sum(sum(used[n]) for n in ASSISTANT if n in used) / CLK
    return {"rate": rate, "client": client, "online": online_n, "target": target_n,
            "completion": 100.0 * target_n / online_n if online_n else 0.0,
            "drops": kernel_drops(live), "failed": failed, "cpu": cpu, "form": form,
            "sessions": st.get("sessions", 0), "online_user_s": user, "online_sys_s": system,
            "assistant_s": assistant, "switches": sw,
            "per_stage_s": {n: (used[n][0] / CLK, used[n][1] / CLK) for n in used},
            "rcs": {n: live.rc(n) for n in (*h.LIVE_CHAIN, "tcpcopy") if n in live.procs}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="500,1000,2000,3000",
                    help="offered requests/s, comma-separated (default 500,1000,2000,3000)")
    ap.add_argument("--duration", type=int, default=10, help="seconds of load per rate")
    ap.add_argument("--conns", type=int, default=20, help="client connections (threads)")
    ap.add_argument("--close", action="store_true", help="one request per connection")
    ap.add_argument("--client", choices=("wrk", "python"),
                    default="wrk" if shutil.which("wrk") else "python")
    ap.add_argument("--offloads", action="store_true", help="kernel default veth offloads")
    ap.add_argument("--capture-arg", action="append", default=[],
                    help="extra tc-capture option (repeatable), e.g. --capture-arg=-s1600")
    ap.add_argument("--session-arg", action="append", default=[],
                    help="extra tc-session option (repeatable)")
    ap.add_argument("--intercept-arg", action="append", default=[],
                    help="extra tc-intercept option (repeatable), e.g. --intercept-arg="
                         "--engine=pcap")
    ap.add_argument("--forms", default="pipe",
                    help="pipe, send, one, c, comma-separated (alternating): the online "
                         "pipeline with tc-pace | tc-emit, tc-session --send, or "
                         "tc-session --capture --send (default pipe)")
    ap.add_argument("--assistant", choices=("pipe", "one"), default="pipe",
                    help="our assistant: tc-intercept | tc-feedback (pipe, the default) or "
                         "tc-feedback --capture (one process)")
    ap.add_argument("--c-tcpcopy", metavar="PATH",
                    help="a C TCPCopy 1.3 binary you built, for the form c")
    ap.add_argument("--c-intercept", metavar="PATH",
                    help="a C intercept 1.0 binary you built, for the form c")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each form at each rate (default 1)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run the pipeline's tools at this nice value (e.g. -10: ahead of "
                         "the client and servers sharing the machine)")
    a = ap.parse_args(argv)
    print(f"live pipeline, client {a.client}, {a.conns} connections, "
          f"{'short' if a.close else 'keep-alive'} connections, {a.duration} s per rate, "
          f"offloads {'on' if a.offloads else 'off'}, assistant {a.assistant}"
          + (f", tools at nice {a.nice}" if a.nice else ""))
    print(f"{'offered':>8} {'client rps':>10} {'online':>7} {'target':>7} {'complete':>9} "
          f"{'drops c+i/a':>11}  cpu % of a core: "
          + " ".join(f"{t.removeprefix('tc-'):>9}" for t in TOOLS))
    worst = 100.0
    forms = a.forms.split(",")
    if not set(forms) <= {"pipe", "send", "one", "c"}:
        ap.error("--forms: pipe, send, one, c, comma-separated")
    if "c" in forms and not (a.c_tcpcopy and a.c_intercept):
        ap.error("the form c needs --c-tcpcopy and --c-intercept")
    per_session: dict = {f: [] for f in forms}
    assist: dict = {f: [] for f in forms}  # the assistant's CPU per session or request
    runs = [(int(rate), form) for rate in a.rates.split(",") for _ in range(a.repeat)
            for form in forms]
    for rate, form in runs:
        with tempfile.TemporaryDirectory(prefix="bench-live-") as wd:
            r = run_rate(a, rate, wd, form)
        c = r["client"]
        print(f"{rate:>8} {c['rps']:>10.0f} {r['online']:>7} {r['target']:>7} "
              f"{r['completion']:>8.2f}% {r['drops']:>11}  {form:>16}"
              + " ".join(f"{r['cpu'].get(t, 0):>9.0f}" for t in TOOLS), flush=True)
        online_s = r["online_user_s"] + r["online_sys_s"]
        if r["online"] and (r["sessions"] or not a.close):
            per_req = online_s / r["online"] * 1e6
            per_sess = online_s / r["sessions"] * 1e6 if r["sessions"] else 0.0
            per_session[form].append((rate, per_sess if a.close else per_req))
            n_unit = r["sessions"] if a.close else r["online"]
            if n_unit:
                assist[form].append((rate, r["assistant_s"] / n_unit * 1e6))
            print(f"{'':8} online host CPU {online_s:.2f} s (user {r['online_user_s']:.2f}, "
                  f"system {r['online_sys_s']:.2f}): "
                  + (f"{per_sess:.0f} us per session ({r['sessions']}), " if per_sess else "")
                  + f"{per_req:.0f} us per request; "
                  + ", ".join(f"{n.removeprefix('tc-')} {u:.2f}+{k:.2f}"
                              for n, (u, k) in r["per_stage_s"].items() if n in ONLINE))
            if assist[form]:
                print(f"{'':8} assistant CPU {r['assistant_s']:.2f} s: {assist[form][-1][1]:.0f}"
                      f" us per {'session' if a.close else 'request'}; "
                      + ", ".join(f"{n.removeprefix('tc-')} {u:.2f}+{k:.2f}"
                                  for n, (u, k) in r["per_stage_s"].items() if n in ASSISTANT))
            print(f"{'':8} context switches per {'session' if a.close else 'request'} "
                  f"(woken+preempted): " + ", ".join(
                      f"{n.removeprefix('tc-')} {v / n_unit:.2f}+{i / n_unit:.2f}"
                      for n, (v, i) in r["switches"].items() if n_unit))
        notes = []
        if c["errors"] or c["rc"]:
            notes.append(f"client rc={c['rc']} errors: {c['errors']}")
        if r["failed"]:
            notes.append(f"tc-session failed sessions: {r['failed']}")
        if any(r["rcs"].values()):
            notes.append(f"exit codes: {r['rcs']}")
        for n in notes:
            print(f"{'':8} {n}")
        worst = min(worst, r["completion"])
    print(f"lowest completion: {worst:.2f}%")
    unit = "session" if a.close else "request"

    def mean_by_form(rate, runs_by_form, what):
        """{form: mean us per unit at rate}, each form's runs printed."""
        means = {}
        for form in forms:
            xs = [us for r_, us in runs_by_form[form] if r_ == rate]
            if xs:
                means[form] = sum(xs) / len(xs)
                print(f"rate {rate}: {form}: {what} CPU per {unit} "
                      + ", ".join(f"{x:.0f}" for x in xs) + f" us (mean {means[form]:.0f})")
        return means

    for rate in sorted({rate for rate, _ in runs}):
        means = mean_by_form(rate, per_session, "online host")
        amean = mean_by_form(rate, assist, "assistant")
        for ours in ("pipe", "send", "one"):
            if amean.get(ours) and amean.get("c"):
                print(f"rate {rate}: assistant CPU per {unit}, {ours} ({a.assistant}) / c "
                      f"= {amean[ours] / amean['c']:.2f}")
        for ours, base in (("send", "pipe"), ("one", "send"), ("pipe", "c"), ("send", "c"),
                           ("one", "c")):
            if means.get(ours) and means.get(base):
                print(f"rate {rate}: online CPU per {unit}, {ours} / {base} = "
                      f"{means[ours] / means[base]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
