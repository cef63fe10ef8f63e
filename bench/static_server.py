"""A trivial keep-alive HTTP server on loopback, run as its own process:

    python -m bench.static_server PORT

`make bench` drives it with wrk first. Against it wrk's figures are the ceiling of
the generator on this machine (or of this server, whichever gives first), so the
broker's and Vault's figures can be read against what the generator can send at all.
"""

from __future__ import annotations

import asyncio
import sys

_STATIC = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            length = 0
            while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            writer.write(_STATIC)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        return
    finally:
        writer.close()


async def serve_static(port: int) -> None:
    """A trivial keep-alive HTTP server on loopback: the generator's own ceiling."""
    server = await asyncio.start_server(_answer, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    asyncio.run(serve_static(int(sys.argv[1])))


if __name__ == "__main__":
    main()
