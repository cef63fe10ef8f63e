"""What the OpenAPI document says beyond FastAPI's defaults: each operation's scopes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

from broker.auth.dependencies import declared_scopes
from broker.auth.scopes import SCOPE_DESCRIPTIONS

OAUTH2 = "OAuth2"
BEARER = "HTTPBearer"

# The broker verifies tokens; it does not issue them. The OAuth2 scheme exists so that
# Swagger UI and ReDoc show each operation's scopes: the token itself is pasted into
# the bearer scheme. `urn:` keeps the document valid without naming an endpoint that
# the broker does not serve.
_TOKEN_URL = "urn:broker:tokens-come-from-your-identity-provider-or-broker-token"  # noqa: S105 - a URN naming where tokens come from, not a password

Extension = Callable[[dict[str, Any]], None]


def install_openapi(app: FastAPI, routers: Iterable[APIRouter], *extensions: Extension) -> None:
    """Add the scopes of the routers' routes, then each extension, to the app's document."""
    generate = app.openapi
    # The routers' own routes: the app's list holds included routers, not their routes.
    routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]

    def openapi() -> dict[str, Any]:
        if getattr(app.state, "openapi_extended", False):
            return generate()
        document = generate()  # built and cached once by the error handlers' hook
        document_scopes(document, routes)
        for extend in extensions:
            extend(document)
        app.state.openapi_extended = True
        return document

    app.openapi = openapi  # type: ignore[method-assign]


def route_scopes(route: APIRoute) -> tuple[str, ...] | None:
    """The scopes the route's `require(...)` dependency demands (any one of them)."""
    stack = list(route.dependant.dependencies)
    while stack:
        dependency = stack.pop()
        scopes = declared_scopes(dependency.call)
        if scopes:
            return scopes
        stack.extend(dependency.dependencies)
    return None


def document_scopes(document: dict[str, Any], routes: Iterable[APIRoute]) -> None:
    """Name each operation's scopes through an OAuth2 scheme, so Swagger UI shows them.

    The route needs any one of its scopes: OpenAPI lists alternatives as separate
    requirements, each with the bearer token and one scope.
    """
    schemes = document.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[OAUTH2] = {
        "type": "oauth2",
        "description": (
            "The scopes a token's `scope` claim must carry. Send the token as a bearer "
            "token (HTTPBearer); an operation needs any one of the scopes it lists."
        ),
        "flows": {"clientCredentials": {"tokenUrl": _TOKEN_URL, "scopes": SCOPE_DESCRIPTIONS}},
    }
    paths = document.get("paths", {})
    for route in routes:
        scopes = route_scopes(route)
        if not scopes:
            continue
        for method in route.methods or ():
            operation = paths.get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            operation["security"] = [{BEARER: [], OAUTH2: [str(scope)]} for scope in scopes]
            listed = ", ".join(f"`{scope}`" for scope in scopes)
            note = f"Needs one of the scopes: {listed}."
            description = operation.get("description", "")
            if note not in description:
                operation["description"] = f"{description}\n\n{note}".strip()
