"""A TCP proxy that holds every chunk for a while before passing it on: PostgreSQL as if
on another host, for the kept-connection S2 (`--s2kept-delay-ms`), where round trips
are what init_action(wait=False) saves.

    python -m bench.latency_proxy --port 0 --to 127.0.0.1:5432 --delay-ms 0.25

Prints the port it listens on, then serves until killed. asyncio's timers round up to
the event loop's clock resolution, so measure the round trip it gives (S2-kept reports
`round_trip_ms`) rather than trusting the figure asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                writer.close()
                return
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(chunk)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        while chunk := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay, chunk))
    finally:
        queue.put_nowait((0.0, b""))
        await sender


async def serve(port: int, host: str, upstream_port: int, delay: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, upstream_port)
        await asyncio.gather(_pump(reader, up_writer, delay), _pump(up_reader, writer, delay),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--to", default="127.0.0.1:5432")
    p.add_argument("--delay-ms", type=float, default=0.25, help="per direction")
    args = p.parse_args()
    host, _, port = args.to.rpartition(":")
    asyncio.run(serve(args.port, host, int(port), args.delay_ms / 1000))


if __name__ == "__main__":
    main()
