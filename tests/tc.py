"""The tests' face of the testing kit (tcpcopylib/testing.py): import from here.

It also checks that the tcpcopylib under test is this checkout's: the kit runs the tools
of the tree tcpcopylib was imported from, and the tests must test the same tree.
"""

from pathlib import Path

from tcpcopylib import testing
from tcpcopylib.testing import (BIN, REPO, call, cbor_items, chain, decode, pcap,  # noqa: F401
                                run, stream, tool_env, tool_path)

if REPO != Path(__file__).resolve().parent.parent:
    raise ImportError(f"tcpcopylib is imported from {testing.__file__}, not from the checkout "
                      f"of these tests ({Path(__file__).parent.parent}): set PYTHONPATH")

env = tool_env  # the old name, for tests written before the kit (use tool_env)


def loopback_exchange(lab, port: int, request: bytes, answer: bytes,
                      client_reads: bool = False):
    """In the lab's online namespace, one TCP connection on 127.0.0.1:port: the client sends
    request (the server reads it whole), the server sends answer, both close. With
    client_reads, the first bytes the client read (else None)."""
    import socket

    with lab.enter("online"):
        srv = socket.create_server(("127.0.0.1", port))
        cl = socket.create_connection(("127.0.0.1", port))
    with srv, cl:
        conn, _ = srv.accept()
        with conn:
            cl.sendall(request)
            got = b""
            while len(got) < len(request) and (part := conn.recv(len(request) - len(got))):
                got += part
            assert got == request
            conn.sendall(answer)
            return cl.recv(10) if client_reads else None
