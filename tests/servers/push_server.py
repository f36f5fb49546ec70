"""Servers that speak on their own (duplex sessions), for the timing tests of tc-session.

    push_server.py --listen HOST:PORT --mode ws|sse [--ready FILE]

ws   a WebSocket server (the `websockets` package): on each connection it pushes text
     frames of random size (10..2000 bytes) at random intervals (20..80 ms) on its own
     timer, and reads the client's frames without answering them, until the client closes.
sse  HTTP/1.1: GET /events... answers a Server-Sent Events stream, an event of random
     size every 20..100 ms until the client closes; GET /poll... is a long poll, answered
     after 30..120 ms with a small body, keep-alive (the client's next poll waits for it).

Sizes and times are random (not seeded): the online server and the target push different
frames at different times, as real pushes do. Runs until SIGTERM/SIGINT; with --ready FILE,
"PID PORT" is written to FILE once listening (port 0: a free port).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal


async def ws_handler(conn) -> None:
    import websockets

    async def pushes():
        while True:
            await asyncio.sleep(random.uniform(0.02, 0.08))
            await conn.send("p" * random.randint(10, 2000))

    task = asyncio.create_task(pushes())
    try:
        async for _ in conn:  # the client's frames: read, not answered
            pass
    except websockets.ConnectionClosed:
        pass
    finally:
        task.cancel()


async def sse_handler(reader, writer) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            if path.startswith(b"/events"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Cache-Control: no-cache\r\n\r\n")
                eof = asyncio.create_task(reader.read(1))
                while not eof.done():
                    writer.write(b"data: " + b"e" * random.randint(5, 1500) + b"\n\n")
                    await writer.drain()
                    await asyncio.wait([eof], timeout=random.uniform(0.02, 0.1))
                return
            await asyncio.sleep(random.uniform(0.03, 0.12))  # the event a poll waits for
            body = b"event " + path + b"\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main_async(host: str, port: int, mode: str, ready: str | None) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    if mode == "ws":
        from websockets.asyncio.server import serve

        server = await serve(ws_handler, host, port, ping_interval=None)
    else:
        server = await asyncio.start_server(sse_handler, host, port)
    port = server.sockets[0].getsockname()[1]
    if ready:
        with open(ready + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {port}\n")
        os.rename(ready + ".tmp", ready)
    await stop
    server.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT")
    ap.add_argument("--mode", choices=("ws", "sse"), required=True)
    ap.add_argument("--ready")
    a = ap.parse_args()
    host, _, port = a.listen.rpartition(":")
    asyncio.run(main_async(host.strip("[]"), int(port), a.mode, a.ready))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
