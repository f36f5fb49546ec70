"""The reply loop: a SYN forged by tc-emit on online reaches the target; its SYN-ACK is seen by
tc-intercept on the assistant and delivered through tc-feedback to the FeedbackClient that
claimed the connection, and never reaches the real client."""

import random
import select
import subprocess
import sys
import time

import pytest

import tc
from tcpcopylib.errors import UnavailableError
from tcpcopylib.feedback import FeedbackClient
from tcpcopylib.packet import TH_ACK, TH_SYN, build_tcp, ip_bytes, parse_tcp

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_synack_reaches_claiming_client_only(lab, tmp_path, v6):
    lab.start_server("target", port=8080)
    client = ip_bytes(lab.client_ip6 if v6 else lab.client_ip)
    target = ip_bytes(lab.target_ip6 if v6 else lab.target_ip)
    addr = f"unix:{tmp_path}/fb.sock"
    icpt = lab.popen("assistant", [sys.executable, tc.tool_path("tc-intercept"), "lan0",
                                   "-F", "tcp and src port 8080", "-v"],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=tc.tool_env())
    fbk = subprocess.Popen([tc.tool_path("tc-feedback"), "--listen", addr, "--stats",
                            "--hold-ms", "500"],
                           stdin=icpt.stdout, stderr=subprocess.PIPE, env=tc.tool_env())
    icpt.stdout.close()
    sniff = lab.sniff("client", lab.client_if, "tcp")
    try:
        assert b"capturing on" in icpt.stderr.readline()
        owner, other = FeedbackClient(addr, "owner"), FeedbackClient(addr, "other")
        for c in (owner, other):
            for _ in range(250):
                try:
                    c.connect(timeout=2)
                    break
                except UnavailableError:
                    time.sleep(0.02)
            assert c.sock is not None, "tc-feedback did not come up"
        sport, seq = random.randint(20000, 60000), random.getrandbits(32)
        owner.claim(client, sport, target, 8080)
        owner.flush()
        other.claim(client, sport + 1, target, 8080)  # someone else's session
        other.flush()
        time.sleep(0.1)
        syn = build_tcp(client, target, sport, 8080, seq, 0, TH_SYN,
                        options=b"\x02\x04\x05\xb4")
        r = lab.run("online", [sys.executable, tc.tool_path("tc-emit"), "--stats"],
                    input=tc.stream([{"t": "pkt", "ts": time.time_ns(), "data": syn}]),
                    capture_output=True, env=tc.tool_env(), timeout=20)
        assert r.returncode == 0, r.stderr
        got = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            select.select([owner], [], [], 0.1)
            got = owner.read_available()
        assert got, "no SYN-ACK delivered to the claiming client"
        t = parse_tcp(got[0]["data"])
        assert (t.src, t.sport, t.dst, t.dport) == (target, 8080, client, sport)
        assert t.flags & (TH_SYN | TH_ACK) == TH_SYN | TH_ACK
        assert t.ack == (seq + 1) & 0xFFFFFFFF
        time.sleep(0.2)
        assert other.read_available() == []
        # the black hole: nothing from the target ever reaches the real client
        assert [f for _, f in sniff.frames(0.3) if parse_tcp(f) and parse_tcp(f).sport == 8080] == []
        owner.close()
        other.close()
    finally:
        sniff.close()
        if icpt.poll() is None:
            icpt.terminate()
        icpt.wait(5)
        try:
            fbk.wait(10)
        finally:
            if fbk.poll() is None:
                fbk.kill()
                fbk.wait()
    err = fbk.stderr.read().decode()
    assert fbk.returncode == 0, err
    assert "0 dropped (slow client)" in err
