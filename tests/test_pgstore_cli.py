"""`gtun store migrate`, `gtun store import` and the `store` key, on a real PostgreSQL
server (a fresh database per test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gtun.app.config import load_server_config
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.peerset import open_state
from gtun.app.pgstore import SCHEMA_VERSION, PgStore, redact
from gtun.app.store import StateStore, StoredPeer
from gtun.cli import main
from gtun.errors import ConfigError
from gtun.lab.net import write_key


def write_relay(tmp: Path, store: str | None) -> Path:
    write_key(tmp / "relay.key", generate_private_key())
    path = tmp / "relay.toml"
    path.write_text(
        "[server]\n"
        'private_key_file = "relay.key"\n'
        'network = "10.66.0.0/24"\n'
        'state_dir = "state"\n'
        'endpoint = "vpn.example.com:9621"\n'
        'control_socket = "relay.sock"\n' + (f'store = "{store}"\n' if store else "")
    )
    return path


def test_bad_store_value_is_a_config_error(tmp_path: Path) -> None:
    path = write_relay(tmp_path, "mysql://x@y/z")
    with pytest.raises(ConfigError, match="server.store: 'mysql://x@y/z' is not a PostgreSQL URI"):
        load_server_config(path)


def test_store_commands_need_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_relay(tmp_path, None)
    assert main(["store", "migrate", "-c", str(path)]) == 2
    assert "server.store: no store is set" in capsys.readouterr().err


def test_migrate_then_relay_and_peer_add_use_the_store(
    tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_relay(tmp_path, pg_dsn)
    # Before migrating: `peer add` (as the relay at start) refuses, naming the key.
    assert main(["peer", "add", "phone", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "server.store: the store's schema is version 0" in err
    assert f"gtun store migrate -c {path}" in err
    assert main(["store", "migrate", "-c", str(path)]) == 0
    assert f"schema version 0 -> {SCHEMA_VERSION}" in capsys.readouterr().out
    assert main(["store", "migrate", "-c", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["peer", "add", "phone", "-c", str(path)]) == 0
    assert "Address = 10.66.0.2/24" in capsys.readouterr().out
    store = open_state(load_server_config(path))
    assert isinstance(store, PgStore)
    with store:
        assert [p.name for p in store.peers()] == ["phone"]
    assert not (tmp_path / "state" / "gtun.sqlite").exists()  # nothing went to SQLite


def test_import_a_single_relays_state(
    tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_relay(tmp_path, pg_dsn)
    cfg = load_server_config(path)
    relay_key = encode_key(cfg.public_key)
    keys = [encode_key(public_key(generate_private_key())) for _ in range(2)]
    with StateStore(tmp_path / "old.sqlite") as old:
        old.add_peer(StoredPeer("alice", keys[0]))
        old.set_lease(keys[0], "10.66.0.2", "alice")
        old.set_lease(keys[1], "10.66.0.3", "bob")  # a config peer's lease
        old.save_endpoints(relay_key, {keys[0]: '["192.0.2.1", 5000]'})
    assert main(["store", "migrate", "-c", str(path)]) == 0
    capsys.readouterr()
    assert main(["store", "import", "-c", str(path), str(tmp_path / "old.sqlite")]) == 0
    out = capsys.readouterr().out
    assert "peers 1 new, 0 already there; leases 2 new" in out
    assert "endpoints 1 new" in out
    assert main(["store", "import", "-c", str(path), str(tmp_path / "old.sqlite")]) == 0
    assert "peers 0 new, 1 already there; leases 0 new, 2 already there" in (
        capsys.readouterr().out
    )
    with PgStore(pg_dsn, cfg.network) as store:
        assert store.leases() == {keys[0]: "10.66.0.2", keys[1]: "10.66.0.3"}
        assert store.endpoints(relay_key) == {keys[0]: '["192.0.2.1", 5000]'}
    assert main(["store", "import", "-c", str(path), str(tmp_path / "missing.sqlite")]) == 2
    assert "missing.sqlite: no such state file" in capsys.readouterr().err


def test_unreachable_store_is_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_relay(tmp_path, f"postgresql://gtun:pw@/gtun?host={tmp_path}")
    assert main(["store", "migrate", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "unavailable" in err and "pw" not in err.replace("postgresql://gtun:***", "")


@pytest.mark.parametrize("shared", [False, True], ids=["sqlite", "postgresql"])
def test_peer_list_disable_enable_remove(
    tmp_path: Path, request: pytest.FixtureRequest, capsys: pytest.CaptureFixture[str], shared: bool
) -> None:
    dsn = request.getfixturevalue("pg_dsn") if shared else None
    path = write_relay(tmp_path, dsn)
    if dsn:
        assert main(["store", "migrate", "-c", str(path)]) == 0
    assert main(["peer", "add", "phone", "-c", str(path)]) == 0
    assert main(["peer", "add", "laptop", "-c", str(path)]) == 0
    capsys.readouterr()
    assert main(["peer", "disable", "phone", "-c", str(path)]) == 0
    assert "peer phone disabled; the relay is not running" in capsys.readouterr().err
    assert main(["peer", "list", "-c", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "ADDRESS", "KEPT"]
    assert lines[1].startswith("phone") and "10.66.0.2" in lines[1] and "disabled" in lines[1]
    assert lines[2].startswith("laptop") and "10.66.0.3" in lines[2]
    cfg = load_server_config(path)
    store = open_state(cfg)
    try:
        assert store.get_lease(store.peers()[0].public_key) == "10.66.0.2"  # kept
    finally:
        store.close()
    assert main(["peer", "enable", "phone", "-c", str(path)]) == 0
    assert main(["peer", "remove", "phone", "-c", str(path)]) == 0
    assert main(["peer", "remove", "phone", "-c", str(path)]) == 2
    assert "no stored peer named phone" in capsys.readouterr().err
    assert main(["peer", "list", "-c", str(path)]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "NAME",
        "laptop",
    ]


# -- `gtun peer add --relay`: a stock peer of another relay of the store ---------------------


def register(dsn: str, name: str, endpoint: str | None, routes: tuple[str, ...] = ()) -> str:
    """A relay of the network in the store's relays table, as it registers at start;
    its public key."""
    key = encode_key(public_key(generate_private_key()))
    with PgStore(dsn, "10.66.0.0/24") as store:
        store.register_relay(key, name, endpoint, routes)
    return key


def peer_line(text: str, key: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"{key} = "))


def test_peer_add_relay_names_that_relay_of_the_store(
    tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_relay(tmp_path, pg_dsn)
    assert main(["store", "migrate", "-c", str(path)]) == 0
    own = encode_key(load_server_config(path).public_key)
    register(pg_dsn, "relay", "vpn.example.com:9621")
    r2 = register(pg_dsn, "r2", "10.244.2.2:9621", ("192.168.77.0/24",))
    r3 = register(pg_dsn, "r3", "fd00::3:9621")  # as a relay registers an IPv6 endpoint
    capsys.readouterr()

    assert main(["peer", "add", "phone", "-c", str(path), "--relay", "r2"]) == 0
    text = capsys.readouterr().out
    assert peer_line(text, "PublicKey") == f"PublicKey = {r2}"
    assert peer_line(text, "Endpoint") == "Endpoint = 10.244.2.2:9621"
    # r2 reaches every relay's routes (the mesh pushes them all), here the LAN at r2.
    assert peer_line(text, "AllowedIPs") == "AllowedIPs = 10.66.0.0/24, 192.168.77.0/24"
    assert peer_line(text, "Address") == "Address = 10.66.0.2/24"

    assert main(["peer", "add", "tablet", "-c", str(path), "--relay", "r3"]) == 0
    text = capsys.readouterr().out
    assert peer_line(text, "PublicKey") == f"PublicKey = {r3}"
    assert peer_line(text, "Endpoint") == "Endpoint = [fd00::3]:9621"

    # --endpoint still overrides the address dialed; the key stays the named relay's.
    args = ["--relay", "r2", "--endpoint", "203.0.113.9:51000"]
    assert main(["peer", "add", "laptop", "-c", str(path), *args]) == 0
    text = capsys.readouterr().out
    assert peer_line(text, "PublicKey") == f"PublicKey = {r2}"
    assert peer_line(text, "Endpoint") == "Endpoint = 203.0.113.9:51000"

    # Without --relay: the relay of -c, and (the mesh carrying them) every relay's routes.
    assert main(["peer", "add", "watch", "-c", str(path)]) == 0
    text = capsys.readouterr().out
    assert peer_line(text, "PublicKey") == f"PublicKey = {own}"
    assert peer_line(text, "Endpoint") == "Endpoint = vpn.example.com:9621"
    assert peer_line(text, "AllowedIPs") == "AllowedIPs = 10.66.0.0/24, 192.168.77.0/24"
    with PgStore(pg_dsn, "10.66.0.0/24") as store:
        assert sorted(p.name for p in store.peers()) == ["laptop", "phone", "tablet", "watch"]


def stored_names(path: Path) -> list[str]:
    store = open_state(load_server_config(path))
    try:
        return [p.name for p in store.peers()]
    finally:
        store.close()


def test_peer_add_relay_refusals_store_nothing(
    tmp_path: Path, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_relay(tmp_path, pg_dsn)
    assert main(["store", "migrate", "-c", str(path)]) == 0
    register(pg_dsn, "relay", "vpn.example.com:9621")
    register(pg_dsn, "r2", None)  # a relay whose config sets no endpoint
    capsys.readouterr()
    out = tmp_path / "phone.conf"

    add = ["peer", "add", "phone", "-c", str(path), "-o", str(out)]
    assert main([*add, "--relay", "r9"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line
        == f"gtun: --relay: no relay named r9 in the store {redact(pg_dsn)}; its relays: r2, relay"
    )

    assert main([*add, "--relay", "r2"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        "gtun: --relay: relay r2 registered no endpoint in the store (its [server] sets "
        "none): pass --endpoint HOST:PORT"
    )
    assert stored_names(path) == [] and not out.exists()

    # Told the endpoint, it is that relay's peer.
    assert main([*add, "--relay", "r2", "--endpoint", "198.51.100.2:9621"]) == 0
    assert "Endpoint = 198.51.100.2:9621" in out.read_text()
    assert stored_names(path) == ["phone"]


def test_peer_add_relay_needs_a_shared_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_relay(tmp_path, None)
    assert main(["peer", "add", "phone", "-c", str(path), "--relay", "r2"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f'gtun: {path}: server.store: --relay needs a shared store (store = "postgresql://..." '
        "in [server]): without one this relay is the only one"
    )
    assert not (tmp_path / "state").exists()  # not even a state file was made
    assert main(["peer", "add", "phone", "-c", str(path)]) == 0  # without --relay: as before
    assert stored_names(path) == ["phone"]
