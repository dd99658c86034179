"""`gtun peer add` and the relay's peer set, without namespaces: preshared keys (made per
peer, stored with it in SQLite, read from `preshared_key_file` in [[peers]] and
[client], written as PresharedKey), `--no-psk`, `--no-dns`, the QR code (terminal and
PNG, decoded back with zbarimg), a name or key clash between the config and the store
refused at start and at reload, and every failure of `peer add` leaving nothing behind.
Tier 2 (in-process daemons on loopback) for the relay and a client with a PSK."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gtun.app import qr
from gtun.app.config import load_client_config, load_server_config
from gtun.app.control import query
from gtun.app.keys import decode_key, encode_key, generate_private_key, public_key
from gtun.app.peerset import open_state, read_peers
from gtun.app.server import Server
from gtun.app.store import SCHEMA_VERSION, StateStore, StoredPeer
from gtun.cli import main
from gtun.errors import ConfigError
from test_daemons import LIMIT, Net, configured, exchange, running, status, until

ENDPOINT = "203.0.113.5:9621"


def server_toml(tmp: Path, peers: str = "", body: str = "") -> Path:
    key = tmp / "server.key"
    if not key.exists():
        key.write_text(encode_key(generate_private_key()) + "\n")
        key.chmod(0o600)
    cfg = tmp / "server.toml"
    cfg.write_text(
        "[server]\n"
        'listen = "0.0.0.0:9621"\n'
        'private_key_file = "server.key"\n'
        'network = "10.66.0.0/29"\n'
        'dns = ["10.66.0.1"]\n'
        f'state_dir = "{tmp / "state"}"\n'
        f'control_socket = "{tmp / "server.sock"}"\n' + body + peers
    )
    return cfg


def write_psk(path: Path, mode: int = 0o600) -> bytes:
    key = os.urandom(32)
    path.write_text(encode_key(key) + "\n")
    path.chmod(mode)
    return key


def stored(cfg: Path) -> list[StoredPeer]:
    with StateStore(tmp_state(cfg)) as store:
        return store.peers()


def tmp_state(cfg: Path) -> Path:
    return cfg.parent / "state" / "gtun.sqlite"


def add(
    cfg: Path, name: str, *args: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    code = main(["peer", "add", name, "-c", str(cfg), "--endpoint", ENDPOINT, *args])
    out, err = capsys.readouterr()
    return code, out, err


def wg_quick_value(text: str, key: str) -> str | None:
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == key:
            return value.strip()
    return None


# --- preshared keys ----------------------------------------------------------------------


def test_peer_add_gives_each_peer_a_preshared_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = server_toml(tmp_path)
    code, out, err = add(cfg, "phone", capsys=capsys)
    assert code == 0, err
    psk = wg_quick_value(out, "PresharedKey")
    assert psk is not None and len(decode_key(psk)) == 32
    code, out2, _ = add(cfg, "tablet", capsys=capsys)
    assert code == 0 and wg_quick_value(out2, "PresharedKey") not in (None, psk)
    peers = {p.name: p for p in stored(cfg)}
    assert peers["phone"].preshared_key == psk
    # The relay's peer set gives it to the core.
    config = load_server_config(cfg)
    store = open_state(config)
    try:
        specs = {s.name: s for s in read_peers(config, store).specs}
    finally:
        store.close()
    assert specs["phone"].preshared_key == decode_key(psk)


def test_no_psk_and_no_dns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = server_toml(tmp_path)
    code, out, err = add(cfg, "phone", "--no-psk", "--no-dns", capsys=capsys)
    assert code == 0, err
    assert "PresharedKey" not in out and "DNS" not in out
    assert wg_quick_value(out, "Address") == "10.66.0.2/29"
    assert stored(cfg)[0].preshared_key is None
    code, out, _ = add(cfg, "tablet", capsys=capsys)
    assert wg_quick_value(out, "DNS") == "10.66.0.1"


def test_preshared_key_files_in_the_configs(tmp_path: Path) -> None:
    psk = write_psk(tmp_path / "alice.psk")
    alice = encode_key(public_key(generate_private_key()))
    peers = f'[[peers]]\nname = "alice"\npublic_key = "{alice}"\npreshared_key_file = "alice.psk"\n'
    cfg = load_server_config(server_toml(tmp_path, peers))
    assert cfg.peers[0].preshared_key == psk
    # Others may read it: refused, naming the key, as a private key would be.
    (tmp_path / "alice.psk").chmod(0o644)
    with pytest.raises(ConfigError) as err:
        load_server_config(tmp_path / "server.toml")
    assert err.value.key == "peers[0].preshared_key_file"
    assert "readable by others (mode 0644); run: chmod 600" in str(err.value)
    (tmp_path / "alice.psk").unlink()
    with pytest.raises(ConfigError, match="create one with: gtun genpsk"):
        load_server_config(tmp_path / "server.toml")

    client_key = tmp_path / "c.key"
    client_key.write_text(encode_key(generate_private_key()))
    client_key.chmod(0o600)
    toml = tmp_path / "client.toml"
    toml.write_text(
        "[client]\n"
        'server = "203.0.113.5:9621"\n'
        f'server_public_key = "{alice}"\n'
        'private_key_file = "c.key"\n'
        'preshared_key_file = "c.psk"\n'
    )
    psk = write_psk(tmp_path / "c.psk")
    assert load_client_config(toml).preshared_key == psk
    (tmp_path / "c.psk").chmod(0o640)
    with pytest.raises(ConfigError, match="client.preshared_key_file: key file .* readable"):
        load_client_config(toml)


def test_gtun_genpsk(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["genpsk"]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["genpsk"]) == 0
    assert len(decode_key(first)) == 32 and capsys.readouterr().out.strip() != first


def test_a_schema_1_state_file_is_upgraded_with_its_peers(tmp_path: Path) -> None:
    path = tmp_path / "gtun.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE schema_version (version INTEGER NOT NULL);"
        "INSERT INTO schema_version VALUES (1);"
        "CREATE TABLE leases (public_key TEXT PRIMARY KEY, address TEXT UNIQUE NOT NULL,"
        " name TEXT, updated REAL);"
        "CREATE TABLE peers (name TEXT PRIMARY KEY, public_key TEXT UNIQUE NOT NULL,"
        " address TEXT, subnets TEXT, created REAL, enabled INTEGER NOT NULL DEFAULT 1);"
        "INSERT INTO peers (name, public_key, subnets, created) VALUES ('old', 'k', '[]', 1);"
    )
    db.commit()
    db.close()
    with StateStore(path) as store:
        assert store.peers() == [StoredPeer("old", "k")]
        store.add_peer(StoredPeer("new", "k2", preshared_key="p"))
        assert store.peers()[1].preshared_key == "p"
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    db.close()
    assert SCHEMA_VERSION == 3


def test_relay_and_client_with_a_preshared_key(
    tmp_path: Path, platforms: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tier 2: the relay's [[peers]] and the client's [client] name one PSK file each
    (same key): the client connects, traffic flows.  Then the relay's file holds
    another key and the relay reloads: the session ends, and the client cannot come
    back."""
    monkeypatch.chdir(tmp_path)
    net = Net(tmp_path)
    psk = write_psk(tmp_path / "c1.psk")
    (tmp_path / "relay.psk").write_bytes((tmp_path / "c1.psk").read_bytes())
    (tmp_path / "relay.psk").chmod(0o600)
    relay_toml = tmp_path / "relay.toml"
    relay_toml.write_text(relay_toml.read_text() + 'preshared_key_file = "relay.psk"\n')
    client_toml = tmp_path / "c1.toml"
    client_toml.write_text(client_toml.read_text() + 'preshared_key_file = "c1.psk"\n')
    relay_pf, client_pf = platforms(), platforms()

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            async with configured(net, relay_pf, client_pf) as (server, client):
                assert server.relay is not None and client.core is not None
                peer = server.relay.peer_by_name("c1")
                assert peer is not None and peer.preshared_key == psk
                assert client.core.server.preshared_key == psk
                await exchange(relay_pf, client_pf, b"with a psk")
                write_psk(tmp_path / "relay.psk")
                answer = await asyncio.to_thread(
                    query, tmp_path / "relay.sock", {"command": "reload"}, 5.0
                )
                assert answer["ok"], answer
                assert peer.current is None and peer.preshared_key != psk

    asyncio.run(scenario())


# --- clashes between the config's [[peers]] and the store -------------------------------


def test_a_clash_is_refused_naming_both_places(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = server_toml(tmp_path)
    assert add(cfg, "phone", capsys=capsys)[0] == 0
    phone_key = stored(cfg)[0].public_key
    other = encode_key(public_key(generate_private_key()))
    # The same name with another key.
    server_toml(tmp_path, f'[[peers]]\nname = "phone"\npublic_key = "{other}"\n')
    config = load_server_config(cfg)
    with open_state(config) as store, pytest.raises(ConfigError) as err:
        read_peers(config, store)
    line = str(err.value)
    assert line.startswith(f"{cfg}: peers[0].name: peer phone is in this file")
    assert str(tmp_state(cfg)) in line and "gtun peer add" in line
    # The same key under another name.
    server_toml(tmp_path, f'[[peers]]\nname = "laptop"\npublic_key = "{phone_key}"\n')
    config = load_server_config(cfg)
    with open_state(config) as store, pytest.raises(ConfigError) as err:
        read_peers(config, store)
    assert "peers[0].public_key" in str(err.value) and "peer phone" in str(err.value)
    # A disabled stored peer still holds its name.
    assert main(["peer", "disable", "phone", "-c", str(cfg)]) == 0
    with open_state(config) as store, pytest.raises(ConfigError):
        read_peers(config, store)
    # The same peer in both (name and key): no clash, served once, as the config says.
    assert main(["peer", "enable", "phone", "-c", str(cfg)]) == 0
    capsys.readouterr()
    server_toml(
        tmp_path,
        f'[[peers]]\nname = "phone"\npublic_key = "{phone_key}"\naddress = "10.66.0.6"\n',
    )
    config = load_server_config(cfg)
    with open_state(config) as store:
        specs = read_peers(config, store).specs
    assert [(s.name, str(s.address)) for s in specs] == [("phone", "10.66.0.6")]
    # peer add meanwhile: refused with one line while the config clashes, nothing stored.
    server_toml(tmp_path, f'[[peers]]\nname = "phone"\npublic_key = "{other}"\n')
    code, out, err_text = add(cfg, "tablet", capsys=capsys)
    assert code == 2 and out == "" and len(err_text.strip().splitlines()) == 1
    assert "peer phone is in this file" in err_text
    assert [p.name for p in stored(cfg)] == ["phone"]


def test_a_clash_stops_the_relay_at_start_and_is_refused_at_reload(
    tmp_path: Path, platforms: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Net(tmp_path)  # the config files
    relay_toml = tmp_path / "relay.toml"
    other = encode_key(public_key(generate_private_key()))
    base = relay_toml.read_text()

    async def scenario() -> None:
        async with asyncio.timeout(LIMIT):
            server = Server(load_server_config(relay_toml), platforms())
            async with running(server):
                await until(lambda: server.relay is not None)
                assert server.relay is not None
                # `gtun peer add c2` beside the running relay; then c2 into the file
                # with another key, and a reload (as SIGHUP or another peer add asks).
                code = await asyncio.to_thread(
                    main, ["peer", "add", "c2", "-c", str(relay_toml), "--endpoint", ENDPOINT]
                )
                assert code == 0
                c2 = server.relay.peer_by_name("c2")
                assert c2 is not None
                relay_toml.write_text(base + f'[[peers]]\nname = "c2"\npublic_key = "{other}"\n')
                answer = await asyncio.to_thread(
                    query, tmp_path / "relay.sock", {"command": "reload"}, 5.0
                )
                assert not answer["ok"]
                assert "relay.toml: peers[1].name: peer c2 is in this file" in answer["error"]
                assert "gtun.sqlite" in answer["error"]
                assert server.relay.peer_by_name("c2") is c2  # kept as it was
                st = await status(tmp_path / "relay.sock")
                assert sorted(p["name"] for p in st["peers"]) == ["c1", "c2"]
            # Started with the clash: refused before anything is opened.
            server = Server(load_server_config(relay_toml), platforms())
            with pytest.raises(ConfigError, match="peer c2 is in this file"):
                await server.run()

    asyncio.run(scenario())


# --- the QR code --------------------------------------------------------------------------

needs_zbar = pytest.mark.skipif(
    shutil.which("zbarimg") is None, reason="zbarimg (apt install zbar-tools) decodes the codes"
)


def zbar(path: Path) -> str:
    """What zbarimg reads in the image `path` (its trailing newline removed)."""
    out = subprocess.run(
        ["zbarimg", "--raw", "-q", str(path)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.removesuffix("\n")


def lines_to_pbm(lines: list[str], path: Path, scale: int = 4) -> None:
    """The terminal's half blocks back into an image: a drawn half is light."""
    light = {"█": (1, 1), "▀": (1, 0), "▄": (0, 1), " ": (0, 0)}
    rows: list[list[int]] = []
    for line in lines:
        pairs = [light[c] for c in line]
        rows.append([1 - top for top, _ in pairs])  # PBM: 1 is black
        rows.append([1 - bottom for _, bottom in pairs])
    width, height = len(rows[0]) * scale, len(rows) * scale
    body = []
    for row in rows:
        text = " ".join(str(v) for v in row for _ in range(scale))
        body.extend([text] * scale)
    path.write_text(f"P1\n{width} {height}\n" + "\n".join(body) + "\n")


@needs_zbar
def test_peer_add_qr_in_the_terminal_and_as_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = server_toml(tmp_path)
    png, conf = tmp_path / "phone.png", tmp_path / "phone.conf"
    code, out, err = add(cfg, "phone", "--qr", "--qr-png", str(png), "-o", str(conf), capsys=capsys)
    assert code == 0, err
    text = conf.read_text()
    assert "PrivateKey" not in out  # the code, not the text
    assert oct(png.stat().st_mode & 0o777) == "0o600"
    assert png.read_bytes().startswith(b"\x89PNG")
    assert zbar(png) == text
    lines = out.splitlines()
    assert set("".join(lines)) <= set("█▀▄ ") and len(lines) < 60  # fits a terminal
    lines_to_pbm(lines, tmp_path / "terminal.pbm")
    assert zbar(tmp_path / "terminal.pbm") == text
    # On a terminal each line sets its colours (white on black) and resets them.
    coloured = qr.terminal_lines(text, color=True)
    assert all(line.startswith("\x1b[40;97m") and line.endswith("\x1b[0m") for line in coloured)


def test_a_configuration_too_long_for_a_qr_code_is_one_line() -> None:
    with pytest.raises(ConfigError, match="too long for a QR code"):
        qr.terminal_lines("x" * 8000, color=False)


# --- peer add leaves nothing behind when it fails --------------------------------------


def test_peer_add_failures_leave_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = server_toml(tmp_path)
    conf, png = tmp_path / "t.conf", tmp_path / "t.png"

    def one_line(err: str) -> str:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    # A directory that does not exist: refused before anything is stored.
    code, out, err = add(cfg, "tablet", "-o", "/nonexistent/t.conf", capsys=capsys)
    assert code == 2 and out == ""
    assert one_line(err) == "gtun: /nonexistent/t.conf: cannot create it: No such file or directory"
    assert stored(cfg) == []
    # The PNG exists already: neither file is left, nothing stored.
    png.write_bytes(b"mine")
    code, _, err = add(cfg, "tablet", "-o", str(conf), "--qr-png", str(png), capsys=capsys)
    assert code == 2 and "t.png: already exists" in one_line(err)
    assert not conf.exists() and png.read_bytes() == b"mine" and stored(cfg) == []
    png.unlink()

    # Writing fails once the peer is stored (a full disk): it is removed again.
    def full(text: str, out: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(qr, "write_png", full)
    code, _, err = add(cfg, "tablet", "-o", str(conf), "--qr-png", str(png), capsys=capsys)
    assert code == 1 and one_line(err) == f"gtun: {png}: cannot write it: No space left on device"
    assert not conf.exists() and not png.exists() and stored(cfg) == []
    with StateStore(tmp_state(cfg)) as store:
        assert store.leases() == {}  # its lease went with it
    monkeypatch.undo()

    # The pool is full (a /29: five addresses for peers): the sixth is not kept.
    for i in range(5):
        assert add(cfg, f"p{i}", capsys=capsys)[0] == 0
    code, _, err = add(cfg, "tablet", "-o", str(conf), capsys=capsys)
    assert code == 1 and "no free address left" in one_line(err)
    assert not conf.exists() and "tablet" not in [p.name for p in stored(cfg)]
    # After all that, it can be added.
    assert main(["peer", "remove", "p0", "-c", str(cfg)]) == 0
    capsys.readouterr()
    code, _, err = add(cfg, "tablet", "-o", str(conf), "--qr-png", str(png), capsys=capsys)
    assert code == 0, err
    assert wg_quick_value(conf.read_text(), "Address") == "10.66.0.2/29"
    assert png.exists() and "tablet" in [p.name for p in stored(cfg)]


def test_peer_add_help_names_the_new_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gtun", "peer", "add", "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src")),
        timeout=30,
    ).stdout
    for flag in ("--qr", "--qr-png", "--no-psk", "--no-dns"):
        assert flag in out
