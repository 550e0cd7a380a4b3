"""The dashboard: a small web application over the daemon's own files.

It reads what the daemon writes (the event store, read-only; leases.json; the
config; the client store, a page at a time: spa.server.dashboard_clients) and
changes one thing, through the same code as the command line: `revoke` (the
running daemon picks the change up within a second).  It needs
no capability and no network access of its own, and runs as its own process
(`spa-server dashboard`), on loopback by default: reach it through an ssh
tunnel after knocking.

Defences, each tested in tests/unit/test_dashboard.py:
- every page but /login and /static needs a session; sessions are cookies
  signed with a random key (itsdangerous, through Starlette's
  SessionMiddleware), HttpOnly, SameSite=Strict, 8 hours at most, and end
  when the password changes (the session holds the hash's fingerprint);
- every form (login included) carries a CSRF token bound to the session;
- logins lock out after repeated failures (spa.server.webauth);
- the Host header must name the listening address or localhost (a DNS
  rebinding page cannot reach a loopback dashboard);
- a Content-Security-Policy allows only the application's own scripts,
  styles and images: no inline script, no CDN (the server may have no
  internet), and the pages cannot be framed;
- templates autoescape, the live table is filled with textContent; secrets
  (client keys, OTP secrets, the hash) never reach a page;
- connections are bounded and timed (spa.server.webserver: half-open requests
  cannot starve others; tests/integration/test_dashboard_process.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from spa.clitools import format_utc
from spa.server import admin, webauth
from spa.server import config as config_mod
from spa.server import dashboard_clients as views
from spa.server.daemon import FileStamp
from spa.server.errors import LocalError
from spa.server.events import (
    EVENTS_DB,
    Filter,
    histogram,
    query_events,
    read_summary,
)
from spa.server.geoip import Countries
from spa.server.state import StateDir
from spa.store.clients import ClientStore
from spa.store.states import STATES, Activation

HERE = Path(__file__).parent / "web"
SESSION_SECONDS = 8 * 3600
COOKIE = "spa_dashboard"
OUTCOMES = ("accepted", "refused", "lease_start", "lease_end", "dropped", "scan")
GRAPH_OUTCOMES = ("accepted", "refused", "dropped", "scan")
RANGES = {"24h": (86400, 3600), "7d": (7 * 86400, 6 * 3600), "30d": (30 * 86400, 86400)}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SecurityHeaders:
    """Adds HEADERS to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


MAX_BODY = 16 * 1024  # bytes: the forms here are a password or a token


class BodyLimit:
    """Refuses a request body over MAX_BODY (413) before the application
    parses it: an anonymous POST could otherwise make the form parser hold
    up to a gigabyte (1,000 fields of 1 MB, Starlette's limits)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        too_big = not declared.isdigit() or int(declared) > self.limit
        body, more = b"", True
        while more and not too_big:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            too_big = len(body) > self.limit
        if too_big:
            await PlainTextResponse("request too large", status_code=413)(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


@dataclass
class Dashboard:
    """What the handlers share: where the config is, the clock, the login state."""
    config_path: Path
    clock: Callable[[], float] = time.time
    log: Callable[[str], None] = print
    limiter: webauth.LoginLimiter = field(default_factory=webauth.LoginLimiter)
    checking: threading.Lock = field(default_factory=threading.Lock)
    _loaded: tuple[FileStamp, config_mod.ServerConfig] | None = None
    _countries: tuple[Path | None, Countries] | None = None
    # sessions signed out (session id -> when): a copy of the cookie is no
    # session after sign-out (in memory: a restart forgets them; sessions still
    # end SESSION_SECONDS after login, and a new password ends them all)
    ended: dict[str, float] = field(default_factory=dict)
    rows_read: int = 0  # client rows the views read from the store (tests count them)
    _counting: threading.Lock = field(default_factory=threading.Lock)

    def config(self) -> config_mod.ServerConfig:
        """The config, parsed again only when the file changed (its clients
        live in the store: see `store`)."""
        stamp = FileStamp.of(self.config_path)
        loaded = self._loaded
        if stamp is not None and loaded is not None and loaded[0] == stamp:
            return loaded[1]
        config = config_mod.load(self.config_path)
        if stamp is not None:
            self._loaded = (stamp, config)
        return config

    @contextlib.contextmanager
    def store(self) -> Iterator[ClientStore]:
        """The client store for one view (the rows it reads are counted)."""
        with admin.open_store(self.config(), now=self.clock()) as store:
            try:
                yield store
            finally:
                with self._counting:
                    self.rows_read += store.rows_read

    def activation(self) -> Activation:
        return admin.activation(self.config(), now=self.clock())

    def countries(self) -> Countries:
        """The configured GeoIP lookup, opened once per database path (its
        reader maps the file; a page view should not open it again)."""
        path = self.config().geoip_database
        opened = self._countries
        if opened is None or opened[0] != path:
            opened = self._countries = (path, Countries(path))
        return opened[1]

    def credentials(self) -> webauth.Credentials:
        return webauth.load(self.config().state_dir)

    def events_db(self) -> Path:
        return self.config().state_dir / EVENTS_DB


def allowed_hosts(listen: str) -> list[str]:
    host = listen.rpartition(":")[0].strip("[]")
    names = {"localhost", "127.0.0.1", "::1", "[::1]"}
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        names.add(host)
    else:
        if not address.is_unspecified:
            names.add(str(address) if address.version == 4 else f"[{address}]")
    return sorted(names)


def make_app(dash: Dashboard, *, listen: str = config_mod.DEFAULT_DASHBOARD_LISTEN,
             secure_cookie: bool = False) -> Starlette:
    """The ASGI application.  Raises LocalError if no password is set."""
    key = dash.credentials().key
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["ago"] = _ago
    templates.env.filters["utc"] = format_utc

    def page(request: Request, name: str, status: int = 200, **context: Any) -> Response:
        session = request.session
        context.setdefault("flash", session.pop("flash", ""))
        context.setdefault("signed_in", True)
        if context["signed_in"]:
            context.setdefault("group", _group(dash))
        return templates.TemplateResponse(request, name, {"csrf": _csrf(session), **context},
                                          status_code=status)

    def signed_in(request: Request) -> bool:
        """A session from a login with the current password, less than
        SESSION_SECONDS ago (however often the cookie was re-signed since),
        not signed out."""
        session = request.session
        try:
            credentials = dash.credentials()
        except LocalError:
            return False
        at, sid = session.get("at"), session.get("sid")
        return (webauth.same_token(credentials.fingerprint, session.get("auth"))
                and isinstance(at, float | int) and 0 <= dash.clock() - at < SESSION_SECONDS
                and isinstance(sid, str) and sid not in dash.ended)

    def guard(handler: Callable[[Request], Awaitable[Response]]
              ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            if not signed_in(request):
                if request.url.path.startswith("/api/"):
                    return JSONResponse({"error": "not signed in"}, status_code=401)
                return RedirectResponse("/login", status_code=303)
            return await handler(request)
        return guarded

    async def checked_form(request: Request) -> dict[str, str] | Response:
        form = await request.form(max_fields=8, max_part_size=4096)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if not webauth.same_token(request.session.get("csrf"), fields.get("csrf")):
            return PlainTextResponse("the form expired or came from another site; reload "
                                     "the page and try again", status_code=403)
        return fields

    async def login_page(request: Request) -> Response:
        if signed_in(request):
            return RedirectResponse("/", status_code=303)
        return page(request, "login.html", signed_in=False, wait=dash.limiter.wait(dash.clock()))

    async def login(request: Request) -> Response:
        fields = await checked_form(request)
        if isinstance(fields, Response):
            return fields
        credentials = dash.credentials()
        password = fields.get("password", "")[:webauth.MAX_PASSWORD]

        def check() -> bool | None:
            """None: locked.  The lock-out is checked and a failure recorded
            under the same lock as the check, so concurrent attempts cannot
            all slip past the lock-out before the first failure counts."""
            with dash.checking:  # one Argon2id check at a time (256 MiB each)
                if dash.limiter.wait(dash.clock()) > 0:
                    return None
                if credentials.check(password):
                    dash.limiter.succeeded()
                    return True
                dash.limiter.failed(dash.clock())
                return False

        verdict = await run_in_threadpool(check)
        wait = dash.limiter.wait(dash.clock())
        if verdict is None:
            return page(request, "login.html", status=429, wait=wait, signed_in=False,
                        error=f"Too many failed logins: locked for {wait:.0f} more seconds.")
        if not verdict:
            dash.log(f"dashboard login failed src={_peer(request)}")
            error = ("Wrong password." if wait == 0 else
                     f"Wrong password. Too many failures: locked for {wait:.0f} seconds.")
            return page(request, "login.html", status=401, error=error, wait=wait,
                        signed_in=False)
        request.session.clear()  # no fixation: a new session, a new CSRF token
        request.session.update(auth=credentials.fingerprint, csrf=webauth.new_csrf_token(),
                               at=dash.clock(), sid=webauth.new_csrf_token())
        dash.log(f"dashboard login src={_peer(request)}")
        return RedirectResponse("/", status_code=303)

    async def logout(request: Request) -> Response:
        fields = await checked_form(request)
        if isinstance(fields, Response):
            return fields
        now, sid = dash.clock(), request.session.get("sid")
        for old_sid, when in list(dash.ended.items()):
            if now - when > SESSION_SECONDS:
                del dash.ended[old_sid]
        if isinstance(sid, str):
            dash.ended[sid] = now  # any copy of this cookie is no session now
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    async def overview(request: Request) -> Response:
        span = request.query_params.get("range", "24h")
        if span not in RANGES:
            span = "24h"
        data = await run_in_threadpool(_overview, dash, span)
        return page(request, "overview.html", span=span, ranges=list(RANGES), **data)

    async def activity(request: Request) -> Response:
        params = request.query_params
        since_text = params.get("since", "24h") or "24h"
        error = ""
        try:
            since = dash.clock() - admin.parse_duration(since_text)
        except LocalError as exc:
            error, since_text, since = str(exc), "24h", dash.clock() - 86400
        where = Filter(since=since, outcome=params.get("outcome", ""),
                       client=params.get("client", ""), reason=params.get("reason", ""),
                       source=params.get("source", ""))
        rows = await run_in_threadpool(_query, dash, where)
        clients = await run_in_threadpool(_menu, dash)
        return page(request, "activity.html", rows=rows, where=where, since=since_text,
                    error=error, outcomes=OUTCOMES, clients=clients,
                    reasons=sorted(_reasons()), now=dash.clock())

    async def leases_api(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(_leases, dash))

    async def graph(request: Request) -> Response:
        span = request.query_params.get("range", "24h")
        seconds, width = RANGES.get(span, RANGES["24h"])
        svg = await run_in_threadpool(_graph, dash, seconds, width)
        return Response(svg, media_type="image/svg+xml")

    async def revoke(request: Request) -> Response:
        fields = await checked_form(request)
        if isinstance(fields, Response):
            return fields
        name = request.path_params["name"]
        close = fields.get("close") == "1"
        try:
            result = await run_in_threadpool(
                lambda: admin.revoke(dash.config_path, name, now=dash.clock(), close=close))
            message = result.message
            dash.log(f"dashboard revoke client={name} close={int(close)}")
        except LocalError as exc:
            message = str(exc)
        request.session["flash"] = message
        return RedirectResponse(views.back_to(fields.get("next", "")), status_code=303)

    async def clients_page(request: Request) -> Response:
        query, error = views.ClientQuery.parse(request.query_params)
        listing = await run_in_threadpool(_listing, dash, query)
        return page(request, "clients.html", listing=listing, error=error, now=dash.clock(),
                    states=STATES, here=str(request.url.path) + (
                        "?" + request.url.query if request.url.query else ""))

    async def client_page(request: Request) -> Response:
        name = request.path_params["name"]
        row = await run_in_threadpool(_one_client, dash, name)
        if row is None:
            return page(request, "client.html", status=404, row=None, client=name,
                        now=dash.clock(), leases=[])
        leases = [lease for lease in (await run_in_threadpool(_leases, dash))["leases"]
                  if name in lease["clients"]]
        return page(request, "client.html", row=row, client=name, now=dash.clock(),
                    leases=leases, here=f"/clients/{name}")

    routes = [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", guard(overview), methods=["GET"]),
        Route("/activity", guard(activity), methods=["GET"]),
        Route("/graph.svg", guard(graph), methods=["GET"]),
        Route("/api/leases", guard(leases_api), methods=["GET"]),
        Route("/clients", guard(clients_page), methods=["GET"]),
        Route("/clients/{name}", guard(client_page), methods=["GET"]),
        Route("/clients/{name}/revoke", guard(revoke), methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(BodyLimit),
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(listen)),
        Middleware(SessionMiddleware, secret_key=key.hex(), session_cookie=COOKIE,
                   max_age=SESSION_SECONDS, same_site="strict", https_only=secure_cookie),
    ]
    return Starlette(routes=routes, middleware=middleware)


def _csrf(session: dict[str, Any]) -> str:
    token = session.get("csrf")
    if not isinstance(token, str) or not token:
        token = session["csrf"] = webauth.new_csrf_token()
    return token


def _peer(request: Request) -> str:
    return request.client.host if request.client else "-"


def _reasons() -> set[str]:
    from spa.core.errors import Reason
    return {reason.value for reason in Reason}


def _query(dash: Dashboard, where: Filter) -> list[Any]:
    try:
        return query_events(dash.events_db(), where)
    except FileNotFoundError:
        return []


def _group(dash: Dashboard) -> dict[str, Any] | None:
    """The group this server is a member of, as the running daemon says
    (spa.group.link's facts: its clients, etcd's state) or, when it does not
    run, as the config names it; None for a standalone server."""
    config = dash.config()
    try:
        facts = StateDir(config.state_dir).running_server() or {}
    except LocalError:
        facts = {}
    found = facts.get("group")
    if isinstance(found, dict) and isinstance(found.get("name"), str):
        return found
    if config.group is not None:
        return {"name": config.group.name, "member": config.group.member}
    return None


def _leases(dash: Dashboard) -> dict[str, Any]:
    now = dash.clock()
    rows = StateDir(dash.config().state_dir).status(now)
    return {"now": now, "leases": [
        {"address": row.address, "service": row.service, "clients": row.clients,
         "expires": now + row.seconds_left} for row in rows]}


def _listing(dash: Dashboard, query: views.ClientQuery) -> views.ClientListing:
    met = dash.activation()
    with dash.store() as store:
        return views.list_clients(store, query, met, dash.events_db())


def _one_client(dash: Dashboard, name: str) -> views.ClientRow | None:
    met = dash.activation()
    with dash.store() as store:
        return views.one_client(store, name, met, dash.events_db())


def _menu(dash: Dashboard) -> list[str] | None:
    with dash.store() as store:
        return views.menu_names(store)


def _overview(dash: Dashboard, span: str) -> dict[str, Any]:
    now = dash.clock()
    db = dash.events_db()
    try:
        recent = admin.stats(read_summary(db, since=now - RANGES[span][0]))
        year = admin.stats(read_summary(db, since=now - 366 * 86400),
                           countries=dash.countries())
    except FileNotFoundError:
        recent = admin.stats([])
        year = admin.stats([], countries=dash.countries())  # no events yet
    listing = _listing(dash, views.ClientQuery(limit=views.OVERVIEW_ROWS))
    return {"now": now, "leases": _leases(dash)["leases"], "listing": listing,
            "recent": recent, "year": year}


def _graph(dash: Dashboard, seconds: int, width: int) -> str:
    now = dash.clock()
    slots = seconds // width
    start = (now // width + 1) * width - slots * width  # whole buckets, the last one is now
    try:
        counts = histogram(dash.events_db(), since=start, width=width, outcomes=GRAPH_OUTCOMES)
    except FileNotFoundError:
        counts = {name: {} for name in GRAPH_OUTCOMES}
    return render_graph(counts, start=start, width=width, slots=int(slots))


COLOURS = {"accepted": "#2e7d32", "refused": "#e65100", "dropped": "#757575", "scan": "#c62828"}


def render_graph(counts: dict[str, dict[int, int]], *, start: float, width: int,
                 slots: int) -> str:
    """Grouped bars per time bucket, one colour per outcome, with a legend and
    a y scale; numbers only (no text from events reaches the image)."""
    w, h, left, bottom, top = 760, 240, 48, 28, 24
    plot_w, plot_h = w - left - 8, h - bottom - top
    peak = _nice_top(max([0, *(v for series in counts.values() for v in series.values())]))
    slot_w = plot_w / slots
    bar_w = max(1.0, slot_w / (len(counts) + 1))
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
             f'viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">',
             f'<rect width="{w}" height="{h}" fill="#ffffff"/>']
    for i in range(5):
        value = peak * i / 4
        y = top + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{left}" x2="{w - 8}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#e0e0e0"/>')
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" '
                     f'fill="#555">{value:.0f}</text>')
    for k, (outcome, series) in enumerate(counts.items()):
        for slot, value in series.items():
            if 0 <= slot < slots and value:
                bar_h = plot_h * value / peak
                x = left + slot * slot_w + k * bar_w + bar_w / 2
                parts.append(f'<rect class="bar {outcome}" x="{x:.1f}" '
                             f'y="{top + plot_h - bar_h:.1f}" width="{bar_w:.1f}" '
                             f'height="{bar_h:.1f}" fill="{COLOURS[outcome]}">'
                             f'<title>{value}</title></rect>')
        parts.append(f'<rect x="{left + k * 110}" y="6" width="10" height="10" '
                     f'fill="{COLOURS[outcome]}"/><text x="{left + k * 110 + 14}" '
                     f'y="15" fill="#333">{outcome}</text>')
    step = max(1, slots // 6)
    for slot in range(0, slots, step):
        when = time.gmtime(start + slot * width)
        label = time.strftime("%H:%M" if width < 86400 else "%m-%d", when)
        if width >= 6 * 3600 and width < 86400:
            label = time.strftime("%m-%d %Hh", when)
        parts.append(f'<text x="{left + slot * slot_w:.1f}" y="{h - 10}" '
                     f'fill="#555">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _nice_top(value: int) -> int:
    """The smallest 4 x (1, 2 or 5 x 10^k) >= value: four whole gridline steps."""
    step = 1
    while 4 * step < value:
        for factor in (2, 2.5, 2):  # 1 -> 2 -> 5 -> 10 -> 20 ...
            step = int(step * factor)
            if 4 * step >= value:
                break
    return 4 * step


def _ago(when: float | None, now: float | None = None) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, (now if now is not None else time.time()) - when)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"





def serve(dash: Dashboard, listen: str, *, on_ready: Callable[[str], None],
          secure_cookie: bool = False) -> None:
    """Bind, then serve until SIGINT/SIGTERM.  Raises LocalError."""
    import uvicorn

    from spa.server import webserver
    from spa.server.surfaces import Admitter, listen_socket

    app = make_app(dash, listen=listen, secure_cookie=secure_cookie)
    try:
        sock = listen_socket(listen, webserver.BACKLOG)
    except OSError as exc:
        raise LocalError(f"cannot listen on {listen}: {exc.strerror}; pick another with "
                         "--listen HOST:PORT or [dashboard] listen") from None
    # proxy_headers off: every tunnelled request comes from loopback, which
    # uvicorn would otherwise trust to set X-Forwarded-For (a forged source in
    # the login log).  Connections are bounded by spa.server.webserver, not by
    # limit_concurrency (which would answer 503 to all once 64 are half-open);
    # no WebSocket (no route needs one).
    protocol = webserver.bounded_h11(Admitter(webserver.MAX_CONNECTIONS,
                                              webserver.REQUEST_SECONDS))
    server = uvicorn.Server(uvicorn.Config(
        app, http=protocol, ws="none", log_level="warning", access_log=False,
        server_header=False, date_header=False, proxy_headers=False,
        backlog=webserver.BACKLOG, timeout_keep_alive=webserver.IDLE_SECONDS,
        h11_max_incomplete_event_size=webserver.MAX_HEADER_BYTES))
    on_ready(f"http://{listen}/")
    server.run(sockets=[sock])
