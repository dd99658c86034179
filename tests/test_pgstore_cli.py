"""`gtun store migrate`, `gtun store import` and the `store` key, on a real PostgreSQL
server (a fresh database per test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gtun.app.config import load_server_config
from gtun.app.keys import encode_key, generate_private_key, public_key
from gtun.app.peerset import open_state
from gtun.app.pgstore import SCHEMA_VERSION, PgStore
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
