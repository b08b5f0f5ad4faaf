"""The dashboard at ``/ui``: server-rendered pages (Jinja2), refreshed in place with htmx,
usage charts drawn by uPlot, and a live event stream (server-sent events). Both libraries are
vendored under ``static/vendor``: nothing is fetched at install or run time.

Signing in takes an API token (operator, org or app) through a form, or a ``?token=`` link
(which sets the cookie and moves on to a URL without the token). The token is kept in an
HttpOnly, SameSite=Strict cookie and checked on every request; each page shows what that
token may read through the API, nothing more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.responses import StreamingResponse

from hangar import __version__
from hangar.api.services.usage import UsageService
from hangar.clock import Clock
from hangar.errors import HangarError, RateLimited, Unauthenticated
from hangar.model.usage import UsageAmounts
from hangar.web.events import EventStreams
from hangar.web.pages import DashboardReader
from hangar.web.viewer import Viewer, Viewers

HERE = Path(__file__).resolve().parent
COOKIE = "hangar_ui"
COOKIE_MAX_AGE_S = 12 * 3600
MAX_LOGIN_BYTES = 4096
MOUNT = "/ui"
WINDOWS = {"1h": (3600.0, 60), "24h": (86400.0, 96), "7d": (7 * 86400.0, 84)}
DEFAULT_WINDOW = "1h"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class NeedsLogin(Exception):
    """No valid token: a page goes to the login form, data answers 401."""

    def __init__(self, reason: str, page: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.page = page


def viewer_of(request: Request, page: bool = False) -> Viewer:
    """The viewer signed in by the request's cookie (``NeedsLogin`` if none is)."""
    viewers: Viewers = request.app.state.viewers
    secret = request.cookies.get(COOKIE)
    if not secret:
        raise NeedsLogin("sign in with an API token", page)
    try:
        return viewers.viewer(secret)
    except HangarError as exc:
        raise NeedsLogin(str(exc), page) from None


def current_viewer(request: Request) -> Viewer:
    return viewer_of(request)


ViewerDep = Annotated[Viewer, Depends(current_viewer)]


def create_web_app(
    viewers: Viewers,
    reader: DashboardReader,
    usage: UsageService,
    streams: EventStreams,
    clock: Clock,
) -> FastAPI:
    web = FastAPI(title="hangar dashboard", openapi_url=None, docs_url=None, redoc_url=None)
    web.state.viewers = viewers
    web.state.streams = streams
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals["mount"] = MOUNT
    templates.env.globals["version"] = __version__
    web.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        response = templates.TemplateResponse(request, name, context, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    @web.exception_handler(NeedsLogin)
    async def _login_first(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, NeedsLogin)
        if exc.page:
            return RedirectResponse(f"{MOUNT}/login", status_code=303)
        return JSONResponse({"error": exc.reason, "status": "unauthenticated"}, 401)

    def overview(viewer: Viewer) -> dict[str, Any]:
        return {
            "board": reader.dashboard(viewer),
            "viewer": viewer,
            "cost": _cost_today(usage, viewer, clock) if viewer.org_wide else None,
            "currency": usage.prices.currency,
        }

    def signed_in(secret: str, request: Request) -> Response:
        """Set the cookie, then move on with a page of our own (a same-site navigation, so
        the Strict cookie goes with it), leaving no token in the address bar or history."""
        response = page(request, "signed_in.html", {"target": f"{MOUNT}/"})
        # This page's address may hold the token: never send it on, even to this origin.
        response.headers["Referrer-Policy"] = "no-referrer"
        response.set_cookie(
            COOKIE,
            secret,
            max_age=COOKIE_MAX_AGE_S,
            path=MOUNT,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @web.get("/", response_class=HTMLResponse)
    async def dashboard(
        request: Request, token: str | None = Query(None, max_length=256)
    ) -> Response:
        if token is not None:
            try:
                viewers.authenticate(token)
            except HangarError as exc:
                return page(request, "login.html", {"error": str(exc)}, status=401)
            return signed_in(token, request)
        viewer = viewer_of(request, page=True)
        context = overview(viewer) | {"windows": list(WINDOWS), "window": DEFAULT_WINDOW}
        return page(request, "dashboard.html", context)

    @web.get("/login", response_class=HTMLResponse)
    async def login_form(request: Request) -> Response:
        return page(request, "login.html", {"error": ""})

    @web.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        if not _same_origin(request):
            return page(request, "login.html", {"error": "sign in from this page"}, status=403)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BYTES:
                return page(request, "login.html", {"error": "that is not a token"}, status=413)
        fields = parse_qs(body.decode("utf-8", "replace"))
        secret = (fields.get("token") or [""])[0].strip()
        try:
            if not secret:
                raise Unauthenticated("paste an API token")
            viewers.authenticate(secret)
        except HangarError as exc:
            return page(request, "login.html", {"error": str(exc)}, status=401)
        return signed_in(secret, request)

    @web.post("/logout")
    async def logout(request: Request) -> Response:
        if not _same_origin(request):
            return JSONResponse({"error": "cross-site request", "status": "forbidden"}, 403)
        response = RedirectResponse(f"{MOUNT}/login", status_code=303)
        response.delete_cookie(COOKIE, path=MOUNT)
        return response

    @web.get("/partials/machines", response_class=HTMLResponse)
    async def machines_partial(request: Request, viewer: ViewerDep) -> Response:
        rows, states = reader.machine_rows(viewer)
        return page(request, "_machines.html", {"machines": rows, "states": states})

    @web.get("/partials/overview", response_class=HTMLResponse)
    async def overview_partial(request: Request, viewer: ViewerDep) -> Response:
        return page(request, "_overview.html", overview(viewer))

    @web.get("/usage.json")
    async def usage_series(
        viewer: ViewerDep, window: str = Query(DEFAULT_WINDOW, max_length=8)
    ) -> Response:
        if not viewer.org_wide:
            return JSONResponse(
                {"error": "this token cannot read usage", "status": "forbidden"}, 403
            )
        span, buckets = WINDOWS.get(window, WINDOWS[DEFAULT_WINDOW])
        now = clock.now()
        series = usage.series(viewer.org, now - span, now, buckets)
        body = series.model_dump()
        body["x"] = [series.start + index * series.bucket_s for index in range(buckets)]
        body["currency"] = usage.prices.currency
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @web.get("/events")
    async def events(request: Request, viewer: ViewerDep, since: int = Query(0, ge=0)) -> Response:
        secret = request.cookies.get(COOKIE, "")
        try:
            streams.admit()
        except RateLimited as exc:
            return JSONResponse(
                {"error": exc.message, "status": exc.code},
                429,
                headers={"Retry-After": str(int(exc.retry_after_s))},
            )
        start = since or int(clock.now() * 1000) - 60_000
        return StreamingResponse(
            streams.stream(lambda: viewers.viewer(secret), start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return web


def _same_origin(request: Request) -> bool:
    """A form posted from another site (login CSRF) is refused; browsers say where a POST
    comes from in ``Origin``, and a client that sends none is not a browser page."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _cost_today(usage: UsageService, viewer: Viewer, clock: Clock) -> UsageAmounts:
    """What the viewer's org (every org, for the operator) used in the last 24 hours."""
    now = clock.now()
    series = usage.series(viewer.org, now - 86400.0, now, 1)
    amounts = UsageAmounts()
    amounts.cost = sum(values[0] for values in series.cost.values())
    amounts.seconds = sum(values[0] for values in series.machine_hours.values()) * 3600
    amounts.gpu_seconds = sum(values[0] for values in series.gpu_hours.values()) * 3600
    return amounts
