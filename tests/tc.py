"""Helpers for tests: run the checkout's tools, build streams, decode streams."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / "bin"


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    e.pop("PYTHONUNBUFFERED", None)
    return e


def run(args, input: bytes | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    """Run a tool (args[0] like 'tc-dump') from bin/, capturing bytes."""
    return subprocess.run([str(BIN / args[0]), *map(str, args[1:])], input=input,
                          capture_output=True, timeout=timeout, env=env(), **kw)


def stream(records, tool: str = "test") -> bytes:
    """Encode records as one stream section."""
    import cbor2

    from tcpcopylib.records import encode_section, header

    return encode_section(header(tool)) + b"".join(cbor2.dumps(r) for r in records)


def decode(data: bytes, headers: bool = False) -> list[dict]:
    """Decode a whole stream held in memory."""
    r, w = os.pipe()
    import threading

    def feed():
        with os.fdopen(w, "wb") as f:
            f.write(data)

    t = threading.Thread(target=feed)
    t.start()
    from tcpcopylib.records import RecordReader

    try:
        return list(RecordReader(r, headers=headers))
    finally:
        t.join()
        os.close(r)


def cbor_items(data: bytes) -> list:
    """Every CBOR item of a stream as written (label, header, records; batches not
    expanded), for tests that look at the encoding itself."""
    import io

    import cbor2

    f, out = io.BytesIO(data), []
    dec = cbor2.CBORDecoder(f)
    while f.tell() < len(data):
        out.append(dec.decode())
    return out
