"""The web console (app/console/) in-process on 127.0.0.1 against a fake relay
(tests/console_fake.py), driven by aiohttp's client: login, sessions, CSRF, the
failed-login limit, headers, the JSON API and what it changes, TLS, the config's
refusal of a non-local plain-HTTP listen, and `gtun console passwd`.  Tier 2."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
import re
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from console_fake import fake_relay, write_config
from gtun.app.config import load_server_config
from gtun.app.console import auth, start_console, web
from gtun.app.pgstore import LiveRow
from gtun.app.store import bucket_start
from gtun.cli import main
from gtun.errors import ConfigError

PASSWORD = "correct horse battery"
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'"
)


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "SCRYPT_N", 2**10)  # the stored form names its n
    monkeypatch.setattr(web, "SAMPLE_INTERVAL", 0.3)
    monkeypatch.setattr(web, "STORE_CACHE", 0.0)


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    h = fake_relay(tmp_path)
    auth.write_admin_hash(h.store, auth.hash_password(PASSWORD))
    yield h
    h.store.close()


@asynccontextmanager
async def serving(
    host: Any, ssl_ctx: Any = None
) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    running = await start_console(host)
    h, port = running.address
    scheme = "https" if host.cfg.console_tls_cert else "http"
    jar = aiohttp.CookieJar(unsafe=True)  # cookies from an IP address
    connector = aiohttp.TCPConnector(ssl=ssl_ctx) if ssl_ctx is not None else None
    try:
        async with aiohttp.ClientSession(cookie_jar=jar, connector=connector) as client:
            yield f"{scheme}://{h}:{port}", client
    finally:
        await running.close()


def run(host: Any, scenario: Callable[[str, aiohttp.ClientSession], Awaitable[None]]) -> None:
    async def go() -> None:
        async with serving(host) as (base, client):
            await scenario(base, client)

    asyncio.run(go())


async def login(base: str, client: aiohttp.ClientSession) -> str:
    async with client.post(f"{base}/api/login", json={"password": PASSWORD}) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["csrf"])


def add_stored(host: Any, name: str, **traffic: Any) -> str:
    from gtun.app.keys import encode_key, generate_private_key, public_key
    from gtun.app.store import StoredPeer

    key = encode_key(public_key(generate_private_key()))
    host.store.add_peer(StoredPeer(name=name, public_key=key))
    if traffic:
        host.traffic[name] = traffic
    return key


# --- config ------------------------------------------------------------------------


def test_config_refuses_a_non_local_plain_listen(tmp_path: Path) -> None:
    path = write_config(tmp_path, extra='console_listen = "0.0.0.0:9680"')
    with pytest.raises(ConfigError) as err:
        load_server_config(path)
    text = str(err.value)
    assert "server.console_listen" in text and "console_tls_cert" in text
    assert "console_insecure" in text

    path.write_text(
        path.read_text().replace('"0.0.0.0:9680"', '"0.0.0.0:9680"\nconsole_insecure = true')
    )
    assert load_server_config(path).console_listen == ("0.0.0.0", 9680)


def test_config_console_keys(tmp_path: Path) -> None:
    cfg = load_server_config(write_config(tmp_path))
    assert cfg.console_listen is None and cfg.console_tls_cert is None
    cfg = load_server_config(write_config(tmp_path, extra='console_listen = "127.0.0.1:9680"'))
    assert cfg.console_listen == ("127.0.0.1", 9680) and not cfg.console_insecure
    extra = (
        'console_listen = "192.0.2.1:443"\nconsole_tls_cert = "c.pem"\nconsole_tls_key = "k.pem"'
    )
    cfg = load_server_config(write_config(tmp_path, extra=extra))
    assert cfg.console_tls_cert == tmp_path / "c.pem" and cfg.console_tls_key == tmp_path / "k.pem"
    with pytest.raises(ConfigError, match="server.console_tls_key"):
        load_server_config(write_config(tmp_path, extra='console_tls_cert = "c.pem"'))


# --- auth --------------------------------------------------------------------------


def test_password_hash_form_and_check() -> None:
    text = auth.hash_password("0123456789")
    kind, n, r, p, salt, digest = text.split("$")
    assert (kind, n, r, p) == ("scrypt", str(auth.SCRYPT_N), "8", "1")
    assert len(base64.b64decode(salt)) == 16
    assert auth.verify_password("0123456789", text)
    assert not auth.verify_password("0123456780", text)
    assert not auth.verify_password("0123456789", None)
    assert not auth.verify_password("0123456789", "scrypt$x$8$1$AA==$AA==")
    assert not auth.verify_password("0123456789", text.replace("scrypt", "argon2"))
    with pytest.raises(ConfigError):
        auth.check_new_password("short")


def test_sessions_expire_and_are_bounded() -> None:
    now = [1000.0]
    sessions = auth.Sessions(clock=lambda: now[0])
    s = sessions.create()
    assert sessions.get(s.token) is s
    now[0] += auth.SESSION_IDLE - 1
    assert sessions.get(s.token) is s  # used: idle time restarts
    now[0] += auth.SESSION_IDLE + 1
    assert sessions.get(s.token) is None
    first = sessions.create()
    for _ in range(auth.MAX_SESSIONS):
        sessions.create()
    assert len(sessions) == auth.MAX_SESSIONS
    assert sessions.get(first.token) is None  # the oldest went
    s = sessions.create()
    for _ in range(13):
        now[0] += 3500
        assert sessions.get(s.token) is not None or now[0] - s.created > auth.SESSION_LIFETIME
    assert sessions.get(s.token) is None  # 12 h at most, however busy


# --- login, sessions, CSRF ------------------------------------------------------------


def test_login_wrong_and_right(host: Any) -> None:
    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        async with client.get(f"{base}/api/peers") as r:
            assert r.status == 401 and "error" in await r.json()
        async with client.get(f"{base}/", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/login"
        async with client.get(f"{base}/peer/x", allow_redirects=False) as r:
            assert r.status == 302
        async with client.post(f"{base}/api/login", json={"password": "wrong password"}) as r:
            assert r.status == 401 and (await r.json())["error"] == "wrong password"
            assert "gtun_session" not in r.cookies
        async with client.post(f"{base}/api/login", json={"password": PASSWORD}) as r:
            assert r.status == 200
            csrf = (await r.json())["csrf"]
            cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
        assert "Secure" not in cookie  # plain HTTP on loopback
        async with client.get(f"{base}/api/session") as r:
            assert (await r.json())["csrf"] == csrf
        async with client.get(f"{base}/login", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/"
        async with client.get(f"{base}/") as r:
            assert r.status == 200 and 'id="peers"' in await r.text()
        async with client.post(f"{base}/api/logout", headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200
        async with client.get(f"{base}/api/session") as r:
            assert r.status == 401

    run(host, scenario)


def test_no_password_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = fake_relay(tmp_path)

    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        async with client.post(f"{base}/api/login", json={"password": PASSWORD}) as r:
            assert r.status == 401 and "gtun console passwd" in (await r.json())["error"]

    try:
        run(h, scenario)
    finally:
        h.store.close()


def test_failed_logins_are_limited(host: Any) -> None:
    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        for _ in range(auth.FAILS_PER_ADDRESS):
            async with client.post(f"{base}/api/login", json={"password": "nope nope nope"}) as r:
                assert r.status == 401
        async with client.post(f"{base}/api/login", json={"password": PASSWORD}) as r:
            assert r.status == 429  # even the right password, for now
            assert 0 < int(r.headers["Retry-After"]) <= auth.FAIL_WINDOW

    run(host, scenario)


def test_concurrent_logins_beyond_the_bound_are_refused_at_once(
    host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A burst of logins must not all reach scrypt: those over MAX_VERIFYING get 429
    # without being checked, while the ones in flight finish.
    import threading

    release = threading.Event()
    checked: list[str] = []

    def slow_verify(password: str, stored: str | None) -> bool:
        checked.append(password)
        release.wait(10)
        return False

    monkeypatch.setattr(auth, "verify_password", slow_verify)

    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        async def attempt() -> int:
            async with client.post(f"{base}/api/login", json={"password": "x" * 12}) as r:
                return r.status

        burst = [asyncio.ensure_future(attempt()) for _ in range(auth.MAX_VERIFYING + 3)]
        for _ in range(100):  # until the first MAX_VERIFYING are inside scrypt
            if len(checked) == auth.MAX_VERIFYING:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert len(checked) == auth.MAX_VERIFYING
        release.set()
        statuses = sorted(await asyncio.gather(*burst))
        assert statuses == [401] * auth.MAX_VERIFYING + [429] * 3, statuses

    run(host, scenario)


def test_connections_beyond_the_bound_are_closed(
    host: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Connections that never send a request hold at most MAX_CONNECTIONS descriptors;
    # one more is closed at once, and a slot freed serves again.
    monkeypatch.setattr(web, "MAX_CONNECTIONS", 3)

    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        host_, port = base.removeprefix("http://").rsplit(":", 1)
        idle = [await asyncio.open_connection(host_, int(port)) for _ in range(3)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection(host_, int(port))
        assert await asyncio.wait_for(reader.read(100), 5) == b""  # closed unanswered
        writer.close()
        idle[0][1].close()
        await asyncio.sleep(0.2)
        async with client.get(f"{base}/login") as r:
            assert r.status == 200
        for _, w in idle[1:]:
            w.close()

    run(host, scenario)


def test_rates() -> None:
    from gtun.app.console.view import Rates

    rates = Rates()
    rates.add(10.0, [("a", 0, 0), ("b", 100, 100)])
    assert rates.rate("a") == (0.0, 0.0)  # one sample
    rates.add(12.0, [("a", 2000, 1000), ("b", 50, 300)])
    assert rates.rate("a") == (1000.0, 500.0)
    assert rates.rate("b") == (0.0, 100.0)  # a counter that went down (re-added)
    rates.add(14.0, [("b", 50, 300)])
    assert rates.rate("a") == (0.0, 0.0)  # gone: forgotten
    assert rates.rate("b") == (0.0, 0.0)


def test_everyone_limit() -> None:
    now = [0.0]
    limiter = auth.LoginLimiter(clock=lambda: now[0])
    for i in range(auth.FAILS_PER_MINUTE):
        assert limiter.retry_after(f"192.0.2.{i}") == 0
        limiter.failed(f"192.0.2.{i}")
    assert limiter.retry_after("198.51.100.1") == 60
    now[0] += 61
    assert limiter.retry_after("198.51.100.1") == 0


def test_csrf_is_required_for_changes(host: Any) -> None:
    add_stored(host, "alice")

    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        csrf = await login(base, client)
        url = f"{base}/api/peers/alice/disable"
        async with client.post(url) as r:
            assert r.status == 403
        async with client.post(url, headers={"X-CSRF-Token": "forged" + csrf[6:]}) as r:
            assert r.status == 403
        async with client.delete(f"{base}/api/peers/alice", headers={"X-CSRF-Token": ""}) as r:
            assert r.status == 403
        async with client.post(url, headers={"X-CSRF-Token": "forgé" + csrf[5:]}) as r:
            assert r.status == 403  # not ASCII: refused, not a 500
        assert host.reloads == 0
        assert [p.enabled for p in host.store.peers()] == [True]
        async with client.post(url, headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200
        assert [p.enabled for p in host.store.peers()] == [False]

    run(host, scenario)


def test_loopback_console_answers_to_localhost_only(host: Any) -> None:
    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        port = base.rsplit(":", 1)[1]
        for name, want in (
            (f"localhost:{port}", 200),
            (f"127.0.0.1:{port}", 200),
            (f"[::1]:{port}", 200),
            ("localhost", 200),
            (f"evil.example:{port}", 403),  # a rebound name
            ("127.0.0.1.evil.example", 403),
        ):
            async with client.get(f"{base}/login", headers={"Host": name}) as r:
                assert r.status == want, name

    run(host, scenario)


def test_headers(host: Any) -> None:
    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        for path in ("/login", "/api/peers", "/static/common.js"):
            async with client.get(f"{base}{path}") as r:
                assert r.headers["Content-Security-Policy"] == CSP, path
                assert r.headers["X-Content-Type-Options"] == "nosniff"
                assert r.headers["Referrer-Policy"] == "no-referrer"
        await login(base, client)
        async with client.get(f"{base}/api/status") as r:
            assert r.headers["Cache-Control"] == "no-store"
            assert (await r.json())["role"] == "relay"
        async with client.get(f"{base}/") as r:
            text = await r.text()
            assert r.headers["Content-Security-Policy"] == CSP
        assert "<script>" not in text and "style=" not in text  # nothing inline

    run(host, scenario)


# --- the pages' DOM ---------------------------------------------------------------------

PAGE_IDS = {
    "/": ["peers", "nav-peers", "nav-add", "nav-relays", "nav-doctor", "logout"],
    "/peer/alice": [
        "peer-name",
        "state",
        "enable",
        "disable",
        "remove",
        "quota",
        "set-quota",
        "chart-hour",
        "chart-day",
        "chart-month",
        "sources",
        "drops",
    ],
    "/add": ["new-name", "create", "qr", "config", "download"],
    "/relays": ["relays"],
    "/doctor": ["doctor", "rerun"],
}


def test_pages_have_the_ids(host: Any) -> None:
    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        async with client.get(f"{base}/login") as r:
            text = await r.text()
        for i in ("password", "login", "login-error"):
            assert f'id="{i}"' in text
        await login(base, client)
        for path, ids in PAGE_IDS.items():
            async with client.get(f"{base}{path}") as r:
                assert r.status == 200
                text = await r.text()
            for i in ids + ["nav-peers", "logout"]:
                assert f'id="{i}"' in text, (path, i)
            for src in re.findall(r'src="(/static/[^"]+)"', text):
                async with client.get(f"{base}{src}") as s:
                    assert s.status == 200 and "javascript" in s.headers["Content-Type"]
        async with client.get(f"{base}/peer/%3Cb%3E") as r:  # autoescaped
            assert "<b>" not in await r.text()

    run(host, scenario)


# --- the JSON API ---------------------------------------------------------------------


def decode_qr(data_url: str, tmp: Path) -> str:
    assert data_url.startswith("data:image/png;base64,")
    png = tmp / "qr.png"
    png.write_bytes(base64.b64decode(data_url.split(",", 1)[1]))
    out = subprocess.run(
        ["zbarimg", "--quiet", "--raw", "-Sbinary", str(png)], capture_output=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.decode()


def test_add_peer(host: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    answer: dict[str, Any] = {}

    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        csrf = await login(base, client)
        hdr = {"X-CSRF-Token": csrf}
        async with client.post(f"{base}/api/peers", json={"name": "phone"}, headers=hdr) as r:
            assert r.status == 201, await r.text()
            assert r.headers["Cache-Control"] == "no-store"
            answer.update(await r.json())
        async with client.post(f"{base}/api/peers", json={"name": "phone"}, headers=hdr) as r:
            assert r.status == 409 and "error" in await r.json()
        async with client.post(f"{base}/api/peers", json={"name": "cfg0"}, headers=hdr) as r:
            assert r.status == 409
        async with client.post(f"{base}/api/peers", json={"name": "bad name!"}, headers=hdr) as r:
            assert r.status == 400
        json_type = {**hdr, "Content-Type": "application/json"}
        async with client.post(f"{base}/api/peers", data=b"{", headers=json_type) as r:
            assert r.status == 400
        form = {**hdr, "Content-Type": "text/plain"}  # what a form of another site can send
        async with client.post(f"{base}/api/peers", data=b'{"name": "x"}', headers=form) as r:
            assert r.status == 415
        async with client.get(f"{base}/api/peers") as r:
            rows = {p["name"]: p for p in (await r.json())["peers"]}
        assert rows["phone"]["source"] == "stored" and rows["phone"]["enabled"]
        assert rows["phone"]["address"] == host.store.leases()[rows["phone"]["public_key"]]

    run(host, scenario)
    config = answer["config"]
    assert answer["name"] == "phone" and "[Interface]" in config and "PrivateKey = " in config
    assert "Endpoint = 203.0.113.5:9621" in config
    assert decode_qr(answer["qr"], tmp_path).strip() == config.strip()
    assert host.reloads == 1
    private = re.search(r"PrivateKey = (\S+)", config).group(1)  # type: ignore[union-attr]
    assert private not in caplog.text  # never logged
    assert private not in (host.cfg.state_dir / "gtun.sqlite").read_bytes().decode("latin-1")


def test_changes_go_to_the_store_and_reload(host: Any) -> None:
    add_stored(host, "alice")
    add_stored(host, "bob")

    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        hdr = {"X-CSRF-Token": await login(base, client)}

        async def call(method: str, path: str, want: int, body: Any = None) -> dict[str, Any]:
            async with client.request(method, f"{base}{path}", headers=hdr, json=body) as r:
                assert r.status == want, (path, await r.text())
                return dict(await r.json())

        assert (await call("POST", "/api/peers/alice/disable", 200))["ok"] is True
        assert {p.name: p.enabled for p in host.store.peers()} == {"alice": False, "bob": True}
        await call("POST", "/api/peers/alice/enable", 200)
        assert all(p.enabled for p in host.store.peers())
        await call("PUT", "/api/peers/bob/quota", 200, {"quota": 50 * 2**30})
        assert {p.name: p.quota for p in host.store.peers()}["bob"] == 50 * 2**30
        await call("PUT", "/api/peers/bob/quota", 400, {"quota": "lots"})
        await call("PUT", "/api/peers/bob/quota", 200, {"quota": None})
        assert {p.name: p.quota for p in host.store.peers()}["bob"] is None
        await call("DELETE", "/api/peers/alice", 200)
        assert [p.name for p in host.store.peers()] == ["bob"]
        assert host.reloads == 5
        # a [[peers]] peer: change the config file
        for method, path in (
            ("POST", "/api/peers/cfg0/disable"),
            ("DELETE", "/api/peers/cfg0"),
            ("PUT", "/api/peers/cfg0/quota"),
        ):
            error = (await call(method, path, 400, {"quota": 1}))["error"]
            assert "[[peers]]" in error
        await call("POST", "/api/peers/nobody/disable", 404)
        assert host.reloads == 5

    run(host, scenario)


def test_peer_rows(host: Any) -> None:
    t = __import__("time").time()
    key = add_stored(
        host,
        "alice",
        rx_bytes=1000,
        tx_bytes=500,
        last_handshake=t - 10,
        endpoint="198.51.100.7:40000",
        transport="udp",
        kind="wireguard",
    )
    add_stored(host, "quiet", last_handshake=t - 600)
    add_stored(host, "over")
    asyncio.run(host.status())  # served once: leased, and the lease kept when disabled
    host.store.set_enabled("over", False, "quota")
    host.store.set_quota("over", 10**9)
    # Today's traffic, and earlier this month's (when today is not the month's first day).
    host.store.add_traffic([(key, 700, 300)], t)
    month_start = bucket_start("month", t)
    earlier = month_start < bucket_start("day", t)
    if earlier:
        host.store.add_traffic([(key, 6300, 2700)], month_start)

    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        await login(base, client)
        async with client.get(f"{base}/api/peers") as r:
            first = await r.json()
        await asyncio.sleep(0.5)
        host.traffic["alice"]["rx_bytes"] = 1000 + 100_000
        host.traffic["alice"]["tx_bytes"] = 500 + 50_000
        for _ in range(40):  # the rate shows once a sample after the change is taken
            await asyncio.sleep(0.1)
            async with client.get(f"{base}/api/peers") as r:
                second = await r.json()
            if second["peers"][0]["rate_in"]:
                break
        assert isinstance(first["time"], float)
        rows = {p["name"]: p for p in second["peers"]}
        assert list(rows) == ["alice", "cfg0", "over", "quiet"]
        a = rows["alice"]
        assert a["online"] and a["enabled"] and a["relay"] == "this relay"
        assert a["kind"] == "wireguard" and rows["over"]["kind"] is None
        assert (a["rx_bytes"], a["tx_bytes"]) == (101_000, 50_500)
        assert a["endpoint"] == "198.51.100.7:40000" and a["transport"] == "udp"
        assert 100_000 / 1.5 < a["rate_in"] < 100_000 / 0.25  # samples 0.3 s apart
        assert abs(a["rate_in"] / a["rate_out"] - 2) < 0.01
        assert a["today"] == {"rx": 700, "tx": 300}
        assert a["month"] == ({"rx": 7000, "tx": 3000} if earlier else {"rx": 700, "tx": 300})
        assert rows["cfg0"]["source"] == "config" and rows["cfg0"]["quota"] is None
        assert not rows["quiet"]["online"] and rows["quiet"]["enabled"]
        o = rows["over"]
        assert not o["enabled"] and o["disabled_reason"] == "quota" and not o["online"]
        assert o["quota"] == 10**9 and o["address"] is not None
        for row in second["peers"]:
            assert set(row) >= {
                "name",
                "public_key",
                "address",
                "address6",
                "kind",
                "source",
                "enabled",
                "disabled_reason",
                "online",
                "relay",
                "endpoint",
                "transport",
                "last_handshake",
                "rx_bytes",
                "tx_bytes",
                "rate_in",
                "rate_out",
                "today",
                "month",
                "quota",
            }

    run(host, scenario)


def test_peer_detail(host: Any) -> None:
    t = __import__("time").time()
    key = add_stored(
        host,
        "alice",
        rx_bytes=10,
        tx_bytes=20,
        last_handshake=t - 5,
        drops={"replay": 2, "too_big": 0},
    )
    # Folds at these times (the store puts each into its minute, hour, day and month).
    for when, rx, tx in ((t - 7200 * 13, 1, 1), (t - 120, 5, 6), (t - 60, 7, 8)):
        host.store.add_traffic([(key, rx, tx)], when)
    host.store.add_traffic([(key, 9, 9)], t - 86400 * 40)  # beyond the month view
    host.store.note_sources("", [(key, "198.51.100.7:40000", "udp")], t - 900)
    host.store.note_sources("", [(key, "198.51.100.7:40000", "udp")], t - 100)
    host.store.note_sources("", [(key, "203.0.113.9:5000", "tcp")], t - 10)

    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        await login(base, client)
        async with client.get(f"{base}/api/peers/alice") as r:
            p = await r.json()
        assert p["name"] == "alice" and p["drops"] == {"replay": 2, "too_big": 0}
        assert [s["endpoint"] for s in p["sources"]] == ["203.0.113.9:5000", "198.51.100.7:40000"]
        minute = [bucket_start("minute", t - 120), bucket_start("minute", t - 60)]
        assert p["history"]["hour"] == [[minute[0], 5, 6], [minute[1], 7, 8]]
        assert p["history"]["day"] == p["history"]["hour"]  # nothing else within 24 h
        hours = {start for start, _, _ in p["history"]["month"]}
        assert bucket_start("hour", t - 7200 * 13) in hours
        assert bucket_start("hour", t - 86400 * 40) not in hours
        assert sum(rx for _, rx, _ in p["history"]["month"]) == 1 + 5 + 7
        first, last = p["sources"][1], p["sources"][0]
        assert (first["first_seen"], first["last_seen"]) == (t - 900, t - 100)
        assert last["transport"] == "tcp"
        async with client.get(f"{base}/api/peers/nobody") as r:
            assert r.status == 404

    run(host, scenario)


def test_shared_store_views(host: Any) -> None:
    t = __import__("time").time()
    host.cfg = dataclasses.replace(host.cfg, store="postgresql://gtun@db/gtun")
    host.relay_name = "r1"
    key = add_stored(host, "roamer", relay="r2", last_handshake=t - 900, rx_bytes=5, tx_bytes=5)
    host.store.live_rows[key] = LiveRow(key, "r2", "192.0.2.8:1", "tcp", t - 3, 4000, 2000, t)
    host.store.stats = [
        (
            "r2",
            "KEY2",
            "192.0.2.2:9621",
            3.0,
            {
                "peers": 1,
                "rx_bytes": 4000,
                "tx_bytes": 2000,
                "handshakes": 1,
                "drops": {"replay": 1},
                "store_up": True,
                "mesh": {"r1": True},
            },
        ),
        ("r1", "KEY1", "192.0.2.1:9621", 1.0, {"peers": 0, "store_up": True, "mesh": {"r2": True}}),
        ("r3", "KEY3", None, 400.0, {}),
    ]

    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        await login(base, client)
        async with client.get(f"{base}/api/peers") as r:
            rows = {p["name"]: p for p in (await r.json())["peers"]}
        roamer = rows["roamer"]
        assert roamer["relay"] == "r2" and roamer["online"] and roamer["kind"] is None
        assert (roamer["rx_bytes"], roamer["endpoint"], roamer["transport"]) == (
            4000,
            "192.0.2.8:1",
            "tcp",
        )
        assert rows["cfg0"]["relay"] == "r1"
        async with client.get(f"{base}/api/relays") as r:
            relays = (await r.json())["relays"]
        assert [x["name"] for x in relays] == ["r1", "r2", "r3"]
        assert relays[0]["this"] and relays[1]["alive"] and not relays[2]["alive"]
        assert relays[1]["drops"] == 1 and relays[1]["mesh"] == {"r1": True}

    run(host, scenario)


def test_single_relay_row(host: Any) -> None:
    t = __import__("time").time()
    add_stored(host, "alice", rx_bytes=10, tx_bytes=20, last_handshake=t - 5)

    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        await login(base, client)
        async with client.get(f"{base}/api/relays") as r:
            (row,) = (await r.json())["relays"]
        assert row["this"] and row["alive"] and row["endpoint"] == "203.0.113.5:9621"
        assert row["name"] == "server"  # its config file's stem
        assert (row["peers"], row["handshakes"], row["rx_bytes"], row["drops"]) == (2, 1, 10, 3)

    run(host, scenario)


# --- TLS -------------------------------------------------------------------------------


def test_tls(host: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    host.cfg = dataclasses.replace(host.cfg, console_tls_cert=cert, console_tls_key=key)
    trust = ssl.create_default_context(cafile=str(cert))

    async def go() -> None:
        async with serving(host, trust) as (base, client):
            assert base.startswith("https://")
            async with client.post(f"{base}/api/login", json={"password": PASSWORD}) as r:
                assert r.status == 200
                assert "Secure" in r.headers["Set-Cookie"]
                assert "max-age" in r.headers["Strict-Transport-Security"]
            async with client.get(f"{base}/api/peers") as r:
                assert r.status == 200
            # plain HTTP on the TLS port gets nothing useful
            plain = base.replace("https://", "http://")
            async with aiohttp.ClientSession() as other:
                with pytest.raises(aiohttp.ClientError):
                    async with other.get(f"{plain}/api/peers") as r:
                        await r.read()

    asyncio.run(go())


def test_tls_files_unusable(host: Any, tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    host.cfg = dataclasses.replace(
        host.cfg, console_tls_cert=tmp_path / "bad.pem", console_tls_key=tmp_path / "bad.pem"
    )
    with pytest.raises(ConfigError, match="console_tls"):
        asyncio.run(start_console(host))


# --- gtun console passwd --------------------------------------------------------------


def test_console_passwd_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from console_fake import FakeStore
    from gtun.app import peerset
    from gtun.app.store import StateStore

    path = write_config(tmp_path)
    cfg = load_server_config(path)
    # The real store once it keeps settings (issue 15's store half); this fake until then.
    store: Any = StateStore(cfg.state_dir / "gtun.sqlite")
    if not hasattr(store, "set_setting"):
        store.close()
        store = FakeStore(cfg)
        store.close = lambda: None
        monkeypatch.setattr(peerset, "open_state", lambda cfg: store)
    else:
        store.close()
        store = None
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    assert main(["console", "passwd", "-c", str(path), "--stdin"]) == 2
    assert "at least 10" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["console", "passwd", "-c", str(path), "--stdin"]) == 0
    if store is None:
        store = StateStore(cfg.state_dir / "gtun.sqlite")
    stored = auth.read_admin_hash(store)
    assert stored is not None and stored.startswith("scrypt$")
    assert PASSWORD not in stored
    assert auth.verify_password(PASSWORD, stored)
    assert not auth.verify_password(PASSWORD + "x", stored)


# --- the relay's hook ------------------------------------------------------------------


def test_the_relay_serves_the_console_and_closes_it(tmp_path: Path) -> None:
    """Server.run() starts the console after the control socket, and its unwind
    closes it."""
    import socket

    from gtun.app.server import Server
    from gtun.testing.platform import FakePlatform

    def free_port(kind: int) -> int:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    relay_port, console_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM)
    path = write_config(
        tmp_path, extra=f'console_listen = "127.0.0.1:{console_port}"\nuapi = false'
    )
    path.write_text(path.read_text().replace("127.0.0.1:9621", f"127.0.0.1:{relay_port}"))
    cfg = load_server_config(path)
    server = Server(cfg, FakePlatform())
    base = f"http://127.0.0.1:{console_port}"

    async def go() -> None:
        task = asyncio.create_task(server.run())
        try:
            async with aiohttp.ClientSession() as client:
                for _ in range(500):  # the console comes up after the control socket
                    assert not task.done()
                    try:
                        async with client.get(f"{base}/login") as r:
                            status, text = r.status, await r.text()
                        break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.01)
                assert status == 200 and 'id="password"' in text
                assert cfg.control_socket.exists()
                async with client.get(f"{base}/api/status") as r:
                    assert r.status == 401
        finally:
            server.stop.set()
            await task
        async with aiohttp.ClientSession() as client:
            with pytest.raises(aiohttp.ClientConnectionError):
                async with client.get(f"{base}/login") as r:
                    await r.read()

    asyncio.run(asyncio.wait_for(go(), 20))


def test_doctor(host: Any) -> None:
    """`gtun doctor --json` on the relay's config, in a subprocess, cached."""

    async def scenario(base: str, client: aiohttp.ClientSession) -> None:
        await login(base, client)
        async with client.get(f"{base}/api/doctor") as r:
            first = await r.json()
        async with client.get(f"{base}/api/doctor") as r:
            again = await r.json()
        assert again["ran"] == first["ran"]  # one run serves 30 s
        checks = {c["check"]: c for c in first["checks"]}
        # nothing runs this fake relay's control socket: doctor says so, with the fix
        assert not checks["relay"]["ok"] and "gtun server" in checks["relay"]["fix"]
        assert first["ok"] is False and isinstance(first["ran"], float)

    run(host, scenario)
