"""The dashboard: the static web UI in ``patronus/controller/web/``, served
by the controller at ``/`` (``index.html``) and ``/ui/`` (its scripts and
stylesheet).

The files hold no data and are public; every request the page makes for
data carries the user's bearer token (kept in memory, never in storage).
They are plain routes and a static mount, not API routes, so they are not
part of :data:`patronus.controller.app.ROUTE_ACTIONS` (nothing there is
public but the health checks). A strict Content-Security-Policy keeps the
page to its own origin: no CDN, no inline script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles

__all__ = ["WEB_DIR", "CSP", "install"]

WEB_DIR = Path(__file__).with_name("web")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}


class _Static(StaticFiles):
    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def install(app: Any) -> None:
    """``GET /`` -> index.html; ``/ui/*`` -> the static files."""
    if not (WEB_DIR / "index.html").is_file():   # a copy without the UI: the API alone
        return

    async def index(request: Request) -> Response:
        return FileResponse(WEB_DIR / "index.html", headers=_HEADERS)

    app.add_route("/", index, methods=["GET", "HEAD"], include_in_schema=False)
    app.mount("/ui", _Static(directory=WEB_DIR), name="ui")
