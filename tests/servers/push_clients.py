"""Real clients of servers that speak on their own, for the duplex timing tests.

    push_clients.py ws --server HOST:PORT [--conns N] [--messages M]
    push_clients.py redis --server HOST:PORT [--conns N] [--messages M]
    push_clients.py sse --server HOST:PORT [--conns N] [--messages M]

ws     N WebSocket clients (the `websockets` package), each sending M text frames of random
       size at random intervals (30..90 ms) on its own timer while it reads the server's
       pushes, then closing.
redis  N subscribers (SUBSCRIBE, and PSUBSCRIBE for every other one, each its own channel),
       each sending M PINGs at random intervals (40..120 ms) while reading the messages
       that a publisher connection PUBLISHes to their channels every 15..45 ms; then
       UNSUBSCRIBE and QUIT.
sse    N Server-Sent Events clients (GET /events/K, read for 0.4..0.8 s, close) and N
       long-polling clients (M polls, each after the answer to the previous one).

Prints one JSON line: {"conns": n, "messages": n, "received": bytes, "errors": [...]}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random


def resp(*args) -> bytes:
    """A redis command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a.encode() if isinstance(a, str) else a
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Result:
    def __init__(self):
        self.conns = self.messages = self.received = 0
        self.errors = []


async def drain(reader, res: Result) -> None:
    """Read until EOF, counting."""
    while True:
        data = await reader.read(65536)
        if not data:
            return
        res.received += len(data)


async def ws_client(host, port, k, m, res: Result) -> None:
    from websockets.asyncio.client import connect

    async with connect(f"ws://{host}:{port}/c{k}", ping_interval=None) as ws:
        res.conns += 1

        async def reads():
            async for msg in ws:
                res.received += len(msg)

        task = asyncio.create_task(reads())
        for i in range(m):
            await asyncio.sleep(random.uniform(0.03, 0.09))
            await ws.send(f"c{k}m{i} " + "c" * random.randint(5, 600))
            res.messages += 1
        task.cancel()


async def redis_subscriber(host, port, k, m, started, res: Result) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    res.conns += 1
    pattern = k % 2 == 1
    writer.write(resp("PSUBSCRIBE", f"pch{k}.*") if pattern else resp("SUBSCRIBE", f"ch{k}"))
    await reader.readuntil(b":1\r\n")  # the subscription's confirmation
    started.set_result(None) if not started.done() else None
    task = asyncio.create_task(drain(reader, res))
    for _ in range(m):
        await asyncio.sleep(random.uniform(0.04, 0.12))
        writer.write(resp("PING"))
        res.messages += 1
    writer.write(resp("PUNSUBSCRIBE") if pattern else resp("UNSUBSCRIBE"))
    await asyncio.sleep(0.05)
    writer.write(resp("QUIT"))
    await asyncio.wait_for(task, 10)
    writer.close()


async def redis_publisher(host, port, n, stop, res: Result) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    res.conns += 1
    i = 0
    while not stop.done():
        await asyncio.sleep(random.uniform(0.015, 0.045))
        k = i % n
        chan = f"pch{k}.x" if k % 2 else f"ch{k}"
        writer.write(resp("PUBLISH", chan, "m" * random.randint(5, 800)))
        line = await reader.readline()  # ":<receivers>\r\n": a request/response session
        if not line.startswith(b":"):
            res.errors.append(f"PUBLISH: {line!r}")
        res.messages += 1
        i += 1
    writer.write(resp("QUIT"))
    await reader.read()
    writer.close()


async def sse_client(host, port, k, res: Result) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    res.conns += 1
    writer.write(f"GET /events/{k} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream"
                 f"\r\n\r\n".encode())
    res.messages += 1
    try:
        await asyncio.wait_for(drain(reader, res), random.uniform(0.4, 0.8))
    except asyncio.TimeoutError:
        pass
    writer.close()


async def poll_client(host, port, k, m, res: Result) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    res.conns += 1
    for i in range(m):
        writer.write(f"GET /poll/{k}/{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        res.received += len(head) + len(await reader.readexactly(n))
        res.messages += 1
    writer.close()


async def run(a) -> Result:
    host, _, port = a.server.rpartition(":")
    host = host.strip("[]")
    port = int(port)
    res = Result()
    if a.mode == "ws":
        await asyncio.gather(*(ws_client(host, port, k, a.messages, res)
                               for k in range(a.conns)))
    elif a.mode == "redis":
        started = asyncio.get_running_loop().create_future()
        stop = asyncio.get_running_loop().create_future()
        subs = asyncio.gather(*(redis_subscriber(host, port, k, a.messages, started, res)
                                for k in range(a.conns)))
        await started
        await asyncio.sleep(0.05)
        pub = asyncio.create_task(redis_publisher(host, port, a.conns, stop, res))
        await subs
        stop.set_result(None)
        await pub
    else:
        await asyncio.gather(*(sse_client(host, port, k, res) for k in range(a.conns)),
                             *(poll_client(host, port, k, a.messages, res)
                               for k in range(a.conns)))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("ws", "redis", "sse"))
    ap.add_argument("--server", required=True)
    ap.add_argument("--conns", type=int, default=2)
    ap.add_argument("--messages", type=int, default=10)
    a = ap.parse_args()
    try:
        res = asyncio.run(asyncio.wait_for(run(a), 60))
    except Exception as e:  # noqa: BLE001 (reported in the JSON line, exit 1)
        print(json.dumps({"errors": [repr(e)]}))
        return 1
    print(json.dumps({"conns": res.conns, "messages": res.messages, "received": res.received,
                      "errors": res.errors}))
    return 0 if not res.errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
