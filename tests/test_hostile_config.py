"""Keys and files a user (or an attacker who can write next to them) may hand gtun: a
low-order public key in a config, a SIGHUP reload with one, `gtun peer add -o` onto an
existing file or a symlink; and the relay's summary of handshakes from unknown keys."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from gtun.app.config import load_client_config, load_server_config
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.relaylog import UnknownKeys
from gtun.app.store import StoredPeer
from gtun.errors import ConfigError
from test_cli import one_line_error, run, server_toml, write_key
from test_daemons import (  # noqa: F401
    LIMIT,
    Net,
    configured,
    exchange,
    net,
    until,
)
from test_handshake_limits import LOW_ORDER

BAD = base64.b64encode(LOW_ORDER[2]).decode()


def peers_with(key: str) -> str:
    return f'[[peers]]\nname = "evil"\npublic_key = "{key}"\n'


# --- low-order keys in a config ---------------------------------------------------------


@pytest.mark.parametrize("point", LOW_ORDER)
def test_a_low_order_peer_key_is_refused_at_load(tmp_path: Path, point: bytes) -> None:
    write_key(tmp_path / "server.key")
    cfg = server_toml(tmp_path, peers=peers_with(base64.b64encode(point).decode()))
    with pytest.raises(ConfigError) as info:
        load_server_config(cfg)
    assert info.value.file == str(cfg) and info.value.key == "peers[0].public_key"
    assert "low-order" in str(info.value)


def test_a_low_order_relay_key_is_refused_by_a_client(tmp_path: Path) -> None:
    write_key(tmp_path / "c.key")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[client]\nserver = "192.0.2.1:9621"\nserver_public_key = "{BAD}"\n'
        'private_key_file = "c.key"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_client_config(cfg)
    assert info.value.key == "client.server_public_key" and "low-order" in str(info.value)


def test_gtun_refuses_a_low_order_key_with_one_line_and_exit_2(tmp_path: Path) -> None:
    write_key(tmp_path / "server.key")
    cfg = server_toml(tmp_path, peers=peers_with(BAD))
    result = run("peer", "add", "phone", "-c", str(cfg), "--endpoint", "203.0.113.5:9621")
    assert result.returncode == 2
    line = one_line_error(result)
    assert str(cfg) in line and "peers[0].public_key" in line and BAD in line
    assert "low-order" in line
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_sighup_with_a_low_order_key_keeps_the_peers_and_says_why(
    net: Net,  # noqa: F811
    platforms: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay_pf, client_pf = platforms(), platforms()

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            async with configured(net, relay_pf, client_pf) as (server, _client):
                assert server.relay is not None
                peer = server.relay.peer_by_name("c1")
                assert peer is not None
                path = net.tmp / "relay.toml"
                path.write_text(path.read_text() + peers_with(BAD))
                with caplog.at_level(logging.ERROR, logger="gtun"):
                    os.kill(os.getpid(), signal.SIGHUP)
                    await until(lambda: any("reload failed" in r.message for r in caplog.records))
                [record] = [r for r in caplog.records if "reload failed" in r.message]
                assert "peers[1].public_key" in record.message and "low-order" in record.message
                assert list(server.relay.wg.peers.values()) == [peer]
                assert peer.current is not None  # the session was kept

    asyncio.run(scenario())


def test_a_reload_the_relay_refuses_keeps_the_peers_and_names_the_fault(
    net: Net,  # noqa: F811
    platforms: Any,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stored peer whose subnet lies in the virtual network passes the store's
    checks but not the relay's (Relay.set_peers): the reload fails whole, says which
    peer and why, and the relay serves on with its sessions."""
    relay_pf, client_pf = platforms(), platforms()

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            async with configured(net, relay_pf, client_pf) as (server, _client):
                assert server.relay is not None
                peer = server.relay.peer_by_name("c1")
                assert peer is not None and peer.current is not None
                session = peer.current
                net.add_peer("c2")  # a good change in the same reload: not applied either
                server.store.add_peer(
                    StoredPeer(
                        "evil",
                        encode_key(public_key(generate_private_key())),
                        subnets=("10.66.0.0/25",),
                    )
                )
                with caplog.at_level(logging.ERROR, logger="gtun"):
                    answer = await server.reload()
                assert answer["ok"] is False and "peer evil" in answer["error"]
                [record] = [r for r in caplog.records if "reload failed" in r.message]
                assert "peer evil" in record.message and "10.66.0.0/25" in record.message
                assert str(server.store.path) in record.message  # where "evil" comes from
                assert list(server.relay.wg.peers.values()) == [peer]
                assert peer.current is session
                await exchange(relay_pf, client_pf, b"after a failed reload")
                server.store.remove_peer("evil")
                assert (await server.reload())["added"] == ["c2"]

    asyncio.run(scenario())


# --- gtun peer add -o ---------------------------------------------------------------------


def peer_add(tmp_path: Path, name: str, out: Path) -> Any:
    cfg = tmp_path / "server.toml"
    return run(
        "peer", "add", name, "-c", str(cfg), "--endpoint", "203.0.113.5:9621", "-o", str(out)
    )


def test_peer_add_writes_a_new_private_file(tmp_path: Path) -> None:
    write_key(tmp_path / "server.key")
    server_toml(tmp_path)
    out = tmp_path / "phone.conf"
    old = os.umask(0)  # even with no umask at all
    try:
        result = peer_add(tmp_path, "phone", out)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    assert (out.stat().st_mode & 0o777) == 0o600
    assert "PrivateKey = " in out.read_text()


def test_peer_add_refuses_an_existing_file_and_stores_no_peer(tmp_path: Path) -> None:
    write_key(tmp_path / "server.key")
    server_toml(tmp_path)
    out = tmp_path / "phone.conf"
    out.write_text("precious\n")
    out.chmod(0o644)
    result = peer_add(tmp_path, "phone", out)
    assert result.returncode == 2
    assert str(out) in one_line_error(result) and "exists" in one_line_error(result)
    assert out.read_text() == "precious\n" and (out.stat().st_mode & 0o777) == 0o644
    # Nothing was stored: the same name is free, and its file gets written.
    again = peer_add(tmp_path, "phone", tmp_path / "phone2.conf")
    assert again.returncode == 0, again.stderr
    assert "Address = 10.66.0.2/24" in (tmp_path / "phone2.conf").read_text()


@pytest.mark.parametrize("dangling", [False, True])
def test_peer_add_never_follows_a_symlink(tmp_path: Path, dangling: bool) -> None:
    write_key(tmp_path / "server.key")
    server_toml(tmp_path)
    target = tmp_path / "elsewhere"
    if not dangling:
        target.write_text("not yours\n")
    link = tmp_path / "phone.conf"
    link.symlink_to(target)
    result = peer_add(tmp_path, "phone", link)
    assert result.returncode == 2 and str(link) in one_line_error(result)
    assert link.is_symlink()
    if dangling:
        assert not target.exists()
    else:
        assert target.read_text() == "not yours\n"


# --- handshakes from unknown keys ---------------------------------------------------------


def test_unknown_keys_are_logged_once_then_summarized() -> None:
    keys = [public_key(generate_private_key()) for _ in range(3)]
    u = UnknownKeys(interval=10.0)
    first = u.note(keys[0], "192.0.2.1:5", 100.0)
    assert first is not None and encode_key(keys[0]) in first and "192.0.2.1:5" in first
    # The flood that follows makes no line of its own ...
    assert [u.note(keys[i % 3], f"192.0.2.9:{i}", 100.0 + i / 100) for i in range(500)] == [
        None
    ] * 500
    assert u.due == 110.0
    # ... but one summary when its interval is over, naming the count and the last.
    summary = u.flush(110.0)
    assert summary is not None and summary.startswith("500 more handshakes from unknown keys")
    assert "192.0.2.9:499" in summary and encode_key(keys[499 % 3]) in summary
    assert u.flush(111.0) is None and u.total == 501
    # Quiet for an interval: the next one is logged at once again.
    assert u.note(keys[1], "192.0.2.2:1", 125.0) is not None


def test_a_stored_peer_with_a_low_order_key_is_refused_before_any_lease(tmp_path: Path) -> None:
    """The config's peers are checked as it is read; a peer in the state store (from
    `gtun peer add`, or written by hand) is checked where the peer set is built."""
    from gtun.app.peerset import collect_peers, open_state
    from gtun.app.store import StoredPeer

    write_key(tmp_path / "server.key")
    cfg = load_server_config(server_toml(tmp_path))
    with open_state(cfg) as store:
        store.add_peer(StoredPeer("evil", BAD))
        with pytest.raises(ConfigError) as info:
            collect_peers(cfg, store)
        assert "low-order" in str(info.value) and info.value.file == str(store.path)
        assert store.leases() == {}
