"""Browser-facing protections: the Content-Security-Policy, hardening headers, same-origin posts."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from broker.core.config import Settings


@dataclass(frozen=True)
class Policy:
    """What one page may load beyond its own origin. Empty for every page but a few."""

    scripts: tuple[str, ...] = ()
    frames: tuple[str, ...] = ()
    connects: tuple[str, ...] = ()
    form_targets: tuple[str, ...] = ()
    """Where a form's redirect may lead (Chromium checks form-action on redirects too)."""

    def header(self) -> str:
        """The Content-Security-Policy: no inline script, no framing, nothing foreign."""
        directives = [
            "default-src 'none'",
            " ".join(["script-src 'self'", *self.scripts]),
            "style-src 'self'",
            "img-src 'self' data:",
            " ".join(["connect-src 'self'", *self.connects]),
            " ".join(["form-action 'self'", *self.form_targets]),
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "object-src 'none'",
        ]
        if self.frames:
            directives.append(" ".join(["frame-src", *self.frames]))
        return "; ".join(directives)


DEFAULT_POLICY = Policy()

HARDENING = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer a browser sends `Origin: null` on
    # the console's own form posts, and the origin check below needs the real one.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


def harden(response: Response, policy: Policy = DEFAULT_POLICY, *, cache: bool = False) -> None:
    """Add the console's security headers; pages are never cached (they show tenant data)."""
    response.headers.setdefault("Content-Security-Policy", policy.header())
    for name, value in HARDENING.items():
        response.headers.setdefault(name, value)
    if not cache:
        response.headers.setdefault("Cache-Control", "no-store")


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a URL, lowercased; empty when it has none."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return ""
    return f"{parts.scheme}://{parts.netloc}".lower()


def own_origin(request: Request, settings: Settings) -> str:
    """The console's origin: the configured public URL's, else the request's own."""
    if settings.console_public_url:
        return origin_of(settings.console_public_url)
    host = request.headers.get("host", "")
    return f"{request.url.scheme}://{host}".lower()


def same_origin_post(request: Request, settings: Settings) -> bool:
    """Whether a form post comes from the console's own pages (Origin, else Referer).

    Browsers send Origin on every POST; a post that carries neither header, or says it
    comes from elsewhere, is refused before its CSRF token is even looked at.
    """
    if request.headers.get("sec-fetch-site") not in (None, "same-origin"):
        return False
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        origin = origin_of(request.headers.get("referer", "")) or None
    return origin is not None and origin.lower() == own_origin(request, settings)
