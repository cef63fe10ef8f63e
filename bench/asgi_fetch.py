"""Credential fetches through the broker's ASGI app in this process, for an instruction count.

    python bench/asgi_fetch.py COUNT     # run by `bench.fetch_profile --instructions`

Run by path, under valgrind's callgrind with instrumentation off, and with the source tree
being measured first on PYTHONPATH: it imports only the broker, so any tree can be measured.
The app is built from the environment as `broker serve` builds it, against the bench's
stack. After a warm-up it prints READY and waits for the file named by FETCH_GO, which
the parent creates once it has switched instrumentation on; then it makes COUNT fetches of
FETCH_TARGETS (the bench's fetch targets, JSON) one at a time, prints DONE, and waits for
the file to go before it stops. Each fetch goes through every middleware, the route and
both Vault calls; what it leaves out is uvicorn's HTTP parsing and the inbound socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import uvloop
from fastapi import FastAPI
from starlette.types import Message

from broker.app import create_app
from broker.cli_support import load_settings
from broker.core.logging import configure_logging

WARM_UP = 100


async def fetch(app: FastAPI, target: dict[str, Any]) -> int:
    """One request through the app, as uvicorn would hand it over; its status."""
    path, _, query = target["path"].partition("?")
    headers = [(name.lower().encode(), value.encode()) for name, value in target["headers"].items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": target["method"],
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(scope, receive, send)
    return statuses[0]


async def fetches(app: FastAPI, targets: list[dict[str, Any]], count: int) -> None:
    """`count` fetches, one at a time, round the targets; any answer but 200 stops it."""
    for number in range(count):
        status = await fetch(app, targets[number % len(targets)])
        if status != 200:
            raise RuntimeError(f"a fetch answered {status}")


async def serve(count: int, targets: list[dict[str, Any]], go: Path) -> None:
    settings = load_settings()
    configure_logging(settings.log_level)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        await fetches(app, targets, WARM_UP)
        print("READY", flush=True)  # noqa: T201  # the parent waits for this line
        while not go.exists():
            await asyncio.sleep(0.05)
        await fetches(app, targets, count)
        print("DONE", flush=True)  # noqa: T201
        while go.exists():
            await asyncio.sleep(0.05)


def main() -> None:
    targets = json.loads(os.environ["FETCH_TARGETS"])
    go = Path(os.environ["FETCH_GO"])
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(int(sys.argv[1]), targets, go))


if __name__ == "__main__":
    main()
