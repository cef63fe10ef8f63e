"""Wiring the console into the broker's app: its routers, its static files, `/` -> `/console`."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.responses import RedirectResponse, Response
from starlette.types import Scope

from broker.console import (
    access_pages,
    integrations_pages,
    leases_pages,
    payments_pages,
    settings_pages,
    signin,
)
from broker.console.security import harden

STATIC = Path(__file__).parent / "static"
ROUTERS = (
    signin.router,
    settings_pages.router,
    integrations_pages.router,
    leases_pages.router,
    payments_pages.router,
    access_pages.router,
)


class _StaticAssets(StaticFiles):
    """The console's CSS and JavaScript, with the same hardening headers as its pages."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        harden(response, cache=True)
        response.headers.setdefault("Cache-Control", "public, max-age=300")
        return response


def install_console(app: FastAPI) -> None:
    """Serve the console under /console, and send visitors of `/` there."""
    app.mount("/console/static", _StaticAssets(directory=STATIC), name="console-static")
    for router in ROUTERS:
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/console", status_code=307)
