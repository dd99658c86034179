"""The console's HTTP side: an aiohttp application in the relay's own event loop.

Routes: the pages (jinja2 templates, autoescaped; their JS and CSS served from
static/, no inline script, so a strict Content-Security-Policy holds), and the JSON
API under /api.  Every /api request but login needs the session cookie; every change
(POST, PUT, DELETE) also the session's CSRF token in X-CSRF-Token.  Nothing here is
on the data path: what costs (store reads, JSON of a large answer, scrypt, QR codes,
peer changes) runs in worker threads (background.off_loop).

Rates "now" come from sampling the relay's status every SAMPLE_INTERVAL, only while
someone watches (an API call within WATCH_FOR); a shared store's live rows (sessions
held at other relays) are read at most every LIVE_INTERVAL.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import io
import ipaddress
import json
import logging
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import jinja2
from aiohttp import web

from gtun.app import peers, qr
from gtun.app.background import off_loop
from gtun.app.config import ServerConfig
from gtun.app.console import auth
from gtun.app.console.view import (
    ConsoleStore,
    Rates,
    as_dict,
    peer_rows,
    relay_rows,
)
from gtun.app.store import bucket_start
from gtun.errors import ConfigError, GtunError, RuntimeFailure
from gtun.io.transport import endpoint_text

log = logging.getLogger("gtun")

HERE = Path(__file__).parent
COOKIE = "gtun_session"
SESSION = web.RequestKey("session", auth.Session)
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'"
)
# Tuning knobs.
SAMPLE_INTERVAL = 2.0  # seconds between samples of the relay's counters
WATCH_FOR = 30.0  # seconds after the last API call that sampling goes on
LIVE_INTERVAL = 5.0  # seconds between reads of a shared store's live rows
MAX_CONNECTIONS = 64  # open connections to the console; more are closed at once
STORE_CACHE = 5.0  # seconds the peers' stored rows and totals are reused
DOCTOR_CACHE = 30.0  # seconds a doctor run's answer is reused
DOCTOR_TIMEOUT = 60.0  # seconds a doctor run may take
MAX_BODY = 16 * 1024  # bytes of a request body


class ConsoleHost(Protocol):
    """What the console needs of the relay (app/server.py's Server), and nothing else."""

    cfg: ServerConfig
    store: Any  # a Store: ConsoleStore's methods

    async def status(self) -> dict[str, Any]: ...
    async def reload(self) -> dict[str, Any]: ...


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(data).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status, headers)


class Console:
    """The console of one relay: sessions, the rate sampler, the handlers."""

    def __init__(self, host: ConsoleHost) -> None:
        self.host = host
        self.cfg = host.cfg
        self.store: ConsoleStore = host.store
        self.tls = self.cfg.console_tls_cert is not None
        listen = self.cfg.console_listen
        self.local_only = listen is not None and ipaddress.ip_address(listen[0]).is_loopback
        self.sessions = auth.Sessions()
        self.limiter = auth.LoginLimiter()
        self._verifying = 0  # logins being checked now (auth.MAX_VERIFYING at most)
        self.rates = Rates()
        self.live_rates = Rates()
        self._status: dict[str, Any] | None = None
        self._sampled = 0.0  # monotonic time of the last sample
        self._sampling = asyncio.Lock()
        self._watched_until = 0.0
        self._wake = asyncio.Event()
        self._live: dict[str, Any] = {}
        self._live_read = -LIVE_INTERVAL
        self._stored: tuple[float, dict[str, Any]] | None = None
        self._doctor: dict[str, Any] | None = None
        self._doctor_at = -DOCTOR_CACHE
        self._doctor_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.jinja = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            enable_async=False,
        )

    # --- the application --------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._headers_mw, self._auth_mw], client_max_size=MAX_BODY
        )
        r = app.router
        r.add_get("/login", self.page_login)
        for path, page in (
            ("/", "peers"),
            ("/add", "add"),
            ("/relays", "relays"),
            ("/doctor", "doctor"),
            ("/peer/{name}", "peer"),
        ):
            r.add_get(path, functools.partial(self.page, page))
        r.add_static("/static", HERE / "static", append_version=False)
        r.add_post("/api/login", self.api_login)
        r.add_post("/api/logout", self.api_logout)
        r.add_get("/api/session", self.api_session)
        r.add_get("/api/status", self.api_status)
        r.add_get("/api/peers", self.api_peers)
        r.add_post("/api/peers", self.api_add)
        r.add_get("/api/peers/{name}", self.api_peer)
        r.add_post("/api/peers/{name}/enable", functools.partial(self.api_enable, True))
        r.add_post("/api/peers/{name}/disable", functools.partial(self.api_enable, False))
        r.add_delete("/api/peers/{name}", self.api_remove)
        r.add_put("/api/peers/{name}/quota", self.api_quota)
        r.add_get("/api/relays", self.api_relays)
        r.add_get("/api/doctor", self.api_doctor)
        app.on_startup.append(self._start_sampler)
        app.on_cleanup.append(self._stop_sampler)
        return app

    @web.middleware
    async def _headers_mw(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            response = exc
        h = response.headers
        h["Content-Security-Policy"] = CSP
        h["X-Content-Type-Options"] = "nosniff"
        h["Referrer-Policy"] = "no-referrer"
        h["X-Frame-Options"] = "DENY"
        if request.path.startswith("/api"):
            h["Cache-Control"] = "no-store"
        if self.tls:
            h["Strict-Transport-Security"] = "max-age=31536000"
        if isinstance(response, web.HTTPException):
            raise response
        return response

    @web.middleware
    async def _auth_mw(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        if self.local_only and not _local_host(request.host):
            # DNS rebinding: a page of another site whose name now points at this
            # machine would reach a loopback console under its own name.
            return _error(403, f"this console answers to localhost only, not {request.host}")
        if path == "/login" or path == "/api/login" or path.startswith("/static/"):
            return await handler(request)
        session = self.sessions.get(request.cookies.get(COOKIE))
        if session is None:
            if path.startswith("/api"):
                return _error(401, "not logged in: POST /api/login first")
            raise web.HTTPFound("/login")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            token = request.headers.get("X-CSRF-Token", "")
            # As bytes: compare_digest refuses a str with non-ASCII characters.
            if not token or not hmac.compare_digest(token.encode(), session.csrf.encode()):
                return _error(403, "missing or wrong X-CSRF-Token")
        request[SESSION] = session
        if path.startswith("/api"):
            self._watched()
        return await handler(request)

    # --- the sampler ------------------------------------------------------------------

    def _watched(self) -> None:
        self._watched_until = time.monotonic() + WATCH_FOR
        self._wake.set()

    async def _start_sampler(self, app: web.Application) -> None:
        self._task = asyncio.ensure_future(self._sample_loop())

    async def _stop_sampler(self, app: web.Application) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _sample_loop(self) -> None:
        while True:
            if time.monotonic() >= self._watched_until:
                self._wake.clear()
                await self._wake.wait()
            try:
                await self._sample()
            except Exception as exc:  # the relay stopping, the store away: next time
                log.debug("console: sampling failed: %s", exc)
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def _sample(self) -> dict[str, Any]:
        """The relay's status, sampled now unless a sample is (nearly) younger than
        SAMPLE_INTERVAL: the sampler and a request arriving together sample once."""
        async with self._sampling:
            now = time.monotonic()
            if self._status is not None and now - self._sampled < SAMPLE_INTERVAL * 0.9:
                return self._status
            status = await self.host.status()
            t = time.time()
            self.rates.add(
                t, ((p["public_key"], p["rx_bytes"], p["tx_bytes"]) for p in status["peers"])
            )
            self._status, self._sampled = status, now
            if self.cfg.store is not None and now - self._live_read >= LIVE_INTERVAL:
                self._live_read = now
                try:
                    live = await off_loop(self.store.live)
                except GtunError as exc:
                    log.debug("console: live rows: %s", exc)
                else:
                    self._live = live
                    for key, row in live.items():
                        self.live_rates.add(row.updated, [(key, row.rx_bytes, row.tx_bytes)])
            return status

    async def status(self) -> dict[str, Any]:
        if self._status is not None and time.monotonic() - self._sampled < SAMPLE_INTERVAL:
            return self._status
        return await self._sample()

    # --- pages ------------------------------------------------------------------------

    def _render(self, template: str, **values: Any) -> web.Response:
        text = self.jinja.get_template(template).render(**values)
        return web.Response(
            text=text, content_type="text/html", headers={"Cache-Control": "no-store"}
        )

    async def page_login(self, request: web.Request) -> web.Response:
        if self.sessions.get(request.cookies.get(COOKIE)) is not None:
            raise web.HTTPFound("/")  # logged in already
        return self._render("login.html", title="Log in")

    async def page(self, page: str, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "")
        titles = {
            "peers": "Peers",
            "add": "Add a peer",
            "relays": "Relays",
            "doctor": "Doctor",
            "peer": f"Peer {name}",
        }
        return self._render(f"{page}.html", title=titles[page], page=page, name=name)

    # --- the API: sessions ------------------------------------------------------------

    def _address(self, request: web.Request) -> str:
        return request.remote or "?"

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object.  Only as application/json: a page of another site
        cannot send that type without the browser asking first (CORS), which nothing
        here grants.  Raises HTTPBadRequest (400) or HTTPUnsupportedMediaType (415)."""
        if request.content_type != "application/json":
            raise web.HTTPUnsupportedMediaType(
                text=json.dumps({"error": "send the body as application/json"}),
                content_type="application/json",
            )
        try:
            data = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "the body is not JSON"}), content_type="application/json"
            ) from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "expected a JSON object"}),
                content_type="application/json",
            )
        return data

    async def api_login(self, request: web.Request) -> web.Response:
        address = self._address(request)
        wait = self.limiter.retry_after(address)
        if wait:
            return _error(
                429, "too many failed logins; try again later", {"Retry-After": str(wait)}
            )
        if self._verifying >= auth.MAX_VERIFYING:
            return _error(429, "other logins are being checked; try again", {"Retry-After": "1"})
        self._verifying += 1
        try:
            data = await self._body(request)
            password = data.get("password")
            stored = await off_loop(auth.read_admin_hash, self.store)
            good = isinstance(password, str) and await off_loop(
                auth.verify_password, password, stored
            )
        finally:
            self._verifying -= 1
        if not good:
            self.limiter.failed(address)
            log.warning("console: failed login from %s", address)
            if stored is None:
                return _error(401, "no admin password is set: run gtun console passwd -c CONFIG")
            return _error(401, "wrong password")
        session = self.sessions.create()
        log.info("console: login from %s", address)
        response = _json({"csrf": session.csrf})
        response.set_cookie(
            COOKIE,
            session.token,
            httponly=True,
            samesite="Strict",
            path="/",
            secure=self.tls,
        )
        return response

    async def api_logout(self, request: web.Request) -> web.Response:
        self.sessions.drop(request.cookies.get(COOKIE))
        response = _json({"ok": True})
        response.del_cookie(COOKIE, path="/")
        return response

    async def api_session(self, request: web.Request) -> web.Response:
        return _json({"csrf": request[SESSION].csrf})

    # --- the API: reading -------------------------------------------------------------

    async def _answer(self, data: Any, status: int = 200) -> web.Response:
        body = await off_loop(lambda: json.dumps(data).encode())
        return web.Response(body=body, status=status, content_type="application/json")

    async def api_status(self, request: web.Request) -> web.Response:
        return await self._answer(await self.host.status())

    def _read_stored(self, now: float) -> dict[str, Any]:
        """The store's side of the peer rows (a worker thread)."""
        return {
            "peers": self.store.peers(),
            "leases": self.store.leases(),
            "today": self.store.totals("day", bucket_start("day", now)),
            "month": self.store.totals("month", bucket_start("month", now)),
        }

    async def _stored_now(self) -> dict[str, Any]:
        now = time.time()
        cached = self._stored
        if cached is not None and time.monotonic() - cached[0] < STORE_CACHE:
            return cached[1]
        stored = await off_loop(self._read_stored, now)
        self._stored = (time.monotonic(), stored)
        return stored

    def _rows(self, status: dict[str, Any], stored: dict[str, Any]) -> list[dict[str, Any]]:
        return peer_rows(
            status,
            {p.name for p in self.cfg.peers},
            stored["peers"],
            stored["leases"],
            self._live,
            stored["today"],
            stored["month"],
            self.rates,
            self.live_rates,
            time.time(),
        )

    async def api_peers(self, request: web.Request) -> web.Response:
        status = await self.status()
        try:
            stored = await self._stored_now()
        except GtunError as exc:
            return _error(503, f"the store: {exc}")

        def build() -> bytes:
            rows = self._rows(status, stored)
            return json.dumps({"time": time.time(), "peers": rows}).encode()

        body = await off_loop(build)
        return web.Response(body=body, content_type="application/json")

    async def api_peer(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        status = await self.status()
        try:
            stored = await self._stored_now()
        except GtunError as exc:
            return _error(503, f"the store: {exc}")
        rows = await off_loop(self._rows, status, stored)
        row = next((r for r in rows if r["name"] == name), None)
        if row is None:
            return _error(404, f"no peer named {name}")
        key = row["public_key"]
        here = next((p for p in status["peers"] if p["name"] == name), None)
        now = time.time()

        def read() -> dict[str, Any]:
            day = self.store.traffic(key, "minute", now - 86400)
            return {
                "sources": [as_dict(s) for s in self.store.sources(key)],
                "history": {
                    "hour": [b for b in day if b[0] >= now - 3600],  # the day's last hour
                    "day": day,
                    "month": self.store.traffic(key, "hour", now - 31 * 86400),
                },
            }

        try:
            extra = await off_loop(read)
        except GtunError as exc:
            return _error(503, f"the store: {exc}")
        row["drops"] = dict(here.get("drops") or {}) if here is not None else {}
        row["sources"] = extra["sources"]
        row["history"] = {k: [list(b) for b in v] for k, v in extra["history"].items()}
        return await self._answer(row)

    async def api_relays(self, request: web.Request) -> web.Response:
        status = await self.status()
        stats = None
        if self.cfg.store is not None:
            try:
                stats = await off_loop(self.store.relay_stats)
            except GtunError as exc:
                return _error(503, f"the store: {exc}")
        endpoint = endpoint_text(self.cfg.endpoint)
        return await self._answer(
            {"relays": relay_rows(status, stats, endpoint, time.time(), self.cfg.path.stem)}
        )

    async def api_doctor(self, request: web.Request) -> web.Response:
        fresh = request.query.get("fresh") == "1"  # the page's "Run again"
        async with self._doctor_lock:  # never more than one run at a time
            age = time.monotonic() - self._doctor_at
            if self._doctor is None or age >= DOCTOR_CACHE or (fresh and age >= 2.0):
                self._doctor = await self._run_doctor()
                self._doctor_at = time.monotonic()
            return _json(self._doctor)

    async def _run_doctor(self) -> dict[str, Any]:
        """`gtun doctor --json` on this relay's config, in a process of its own (app/
        may not import doctor/), bounded by DOCTOR_TIMEOUT."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gtun",
            "doctor",
            "-c",
            str(self.cfg.path),
            "--json",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), DOCTOR_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return {"ok": False, "checks": [], "ran": time.time(), "error": "doctor took too long"}
        try:
            checks = json.loads(out)
            if not isinstance(checks, list):
                raise ValueError("not a list")
        except ValueError:
            text = err.decode(errors="replace").strip().splitlines()
            return {
                "ok": False,
                "checks": [],
                "ran": time.time(),
                "error": text[-1] if text else "doctor failed",
            }
        return {"ok": all(c.get("ok") for c in checks), "checks": checks, "ran": time.time()}

    # --- the API: changes -------------------------------------------------------------

    def _changed(self) -> None:
        self._stored = None

    async def _reload_note(self) -> str:
        answer = await self.host.reload()
        if answer.get("ok"):
            shared = " (and every relay of the store heard of it)" if self.cfg.store else ""
            return f"the relay applied the change{shared}"
        return f"stored, but the relay could not reload: {answer.get('error')}"

    async def api_add(self, request: web.Request) -> web.Response:
        data = await self._body(request)
        name = data.get("name")
        if not isinstance(name, str) or not peers.NAME_RE.match(name):
            return _error(400, "a peer name is 1 to 32 of A-Z a-z 0-9 _ . -")
        try:
            stored = await self._stored_now()
        except GtunError as exc:
            return _error(503, f"the store: {exc}")
        status = await self.status()
        taken = {p.name for p in self.cfg.peers} | {p.name for p in stored["peers"]}
        taken |= {p["name"] for p in status["peers"]}
        if name in taken:
            return _error(409, f"a peer named {name} already exists")
        add = functools.partial(peers.add_peer, self.cfg, name, None, tell=False)
        try:
            text, _ = await off_loop(add)
        except ConfigError as exc:
            self._changed()
            code = 409 if "already" in str(exc) else 400
            return _error(code, str(exc))
        except RuntimeFailure as exc:
            self._changed()
            return _error(500, str(exc))
        self._changed()
        log.info("console: peer %s added", name)  # never the text: it holds the private key
        png: str | None = None
        qr_note: str | None = None
        try:
            png = await off_loop(_png_data_url, text)
        except ConfigError as exc:
            qr_note = str(exc)  # too long for a QR code: the text only
        note = await self._reload_note()
        answer = {"name": name, "config": text, "qr": png, "note": qr_note or note}
        return _json(answer, 201, {"Cache-Control": "no-store"})

    async def _change(self, name: str, what: str, fn: Callable[[], object]) -> web.Response:
        """Run one of app/peers.py's changes to stored peer `name` (which refuse a
        [[peers]] entry, this relay's or another's), then reload the relay."""
        try:
            await off_loop(fn)
        except peers.NoSuchPeer:
            self._changed()
            status = await self.status()
            if any(p["name"] == name for p in status["peers"]):
                # Served, but neither this config's nor stored: a config file's [[peers]]
                # added since this relay read its own.
                return _error(400, f"peer {name} is in a config file's [[peers]]; change it there")
            return _error(404, f"no peer named {name}")
        except ConfigError as exc:
            self._changed()
            return _error(400, str(exc))
        except RuntimeFailure as exc:
            self._changed()
            return _error(500, str(exc))
        self._changed()
        log.info("console: %s", what)
        return _json({"ok": True, "note": await self._reload_note()})

    async def api_enable(self, enabled: bool, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        fn = functools.partial(peers.set_peer_enabled, self.cfg, name, enabled, tell=False)
        return await self._change(name, f"peer {name} {'enabled' if enabled else 'disabled'}", fn)

    async def api_remove(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        fn = functools.partial(peers.remove_peer, self.cfg, name, tell=False)
        return await self._change(name, f"peer {name} removed", fn)

    async def api_quota(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        data = await self._body(request)
        quota = data.get("quota")
        if quota is not None and (
            not isinstance(quota, int) or isinstance(quota, bool) or quota < 0
        ):
            return _error(400, "quota is a number of bytes (an integer, 0 or more) or null")
        fn = functools.partial(peers.set_peer_quota, self.cfg, name, quota, tell=False)
        return await self._change(name, f"peer {name} quota {quota}", fn)


def _local_host(host: str) -> bool:
    """Whether a Host header names this machine's loopback: localhost or a loopback
    address, with or without a port."""
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name.lower().rstrip(".") in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _png_data_url(text: str) -> str:
    out = io.BytesIO()
    qr.write_png(text, out)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def tls_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    """The console's TLS context from console_tls_cert/key, or None.  Raises ConfigError."""
    if cfg.console_tls_cert is None or cfg.console_tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cfg.console_tls_cert, cfg.console_tls_key)
    except FileNotFoundError as exc:
        raise ConfigError(
            "no such file", file=cfg.path, key=f"server.console_tls ({exc.filename})"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot load {cfg.console_tls_cert} with {cfg.console_tls_key}: {exc}",
            file=cfg.path,
            key="server.console_tls_cert",
        ) from None
    return context


class _Refused(asyncio.Protocol):
    """A connection over MAX_CONNECTIONS: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


def _bounded(server: web.Server, limit: int) -> Callable[[], asyncio.BaseProtocol]:
    """aiohttp's protocol factory, refusing connections beyond `limit` open ones: an
    unauthenticated host that opens connections and never finishes a request would
    otherwise hold descriptors the relay needs (its TCP transport, its store) until
    the process runs out."""

    def make() -> asyncio.BaseProtocol:
        if len(server.connections) >= limit:
            return _Refused()
        return server()

    return make


class RunningConsole:
    """A started console: its address, and close() (the AsyncClose the relay pushes)."""

    def __init__(
        self, runner: web.AppRunner, listener: asyncio.base_events.Server, console: Console
    ) -> None:
        self.runner = runner
        self.listener = listener
        self.console = console

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.sockets[0].getsockname()[:2]
        return host, port

    async def close(self) -> None:
        self.listener.close()
        await self.runner.cleanup()


async def start_console(server: ConsoleHost) -> RunningConsole:
    """Serve the console of `server` on cfg.console_listen.  Raises ConfigError (the
    address cannot be bound, the TLS files cannot be loaded)."""
    cfg = server.cfg
    assert cfg.console_listen is not None
    context = tls_context(cfg)
    console = Console(server)
    runner = web.AppRunner(console.app(), access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    host, port = cfg.console_listen
    try:
        listener = await asyncio.get_running_loop().create_server(
            _bounded(runner.server, MAX_CONNECTIONS),
            host,
            port,
            ssl=context,
            reuse_address=True,
        )
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot serve the console on {host}:{port}: {exc.strerror or exc}",
            file=cfg.path,
            key="server.console_listen",
        ) from None
    running = RunningConsole(runner, listener, console)
    shown = "https" if context is not None else "http"
    h, p = running.address
    log.info("console on %s://%s:%d/", shown, f"[{h}]" if ":" in h else h, p)
    return running
