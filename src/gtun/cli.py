"""The `gtun` command.  Errors are translated here, once: a ConfigError prints one line
and exits 2, a RuntimeFailure prints one line and exits 1; a traceback only with --debug.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gtun import __version__
from gtun.errors import ConfigError, GtunError, RuntimeFailure

DEFAULT_SERVER_SOCKET = Path("/run/gtun/server.sock")
DEFAULT_CLIENT_SOCKET = Path("/run/gtun/client.sock")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 itself; keep it one line
        self.print_usage(sys.stderr)
        print(f"gtun: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gtun", description="A VPN relay and clients speaking WireGuard.")
    p.add_argument("--version", action="version", version=f"gtun {__version__}")
    p.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("genkey", help="print a new private key")
    sub.add_parser("genpsk", help="print a new preshared key (as `wg genpsk`)")
    sub.add_parser("pubkey", help="read a private key on stdin, print its public key")

    s = sub.add_parser("server", help="run the relay in the foreground")
    s.add_argument("-c", "--config", required=True, type=Path, help="server.toml")

    c = sub.add_parser("client", help="run a client in the foreground")
    c.add_argument("-c", "--config", required=True, type=Path, help="client.toml")

    peer = sub.add_parser("peer", help="manage the relay's peers")
    peer_sub = peer.add_subparsers(dest="peer_command", required=True, parser_class=_Parser)
    add = peer_sub.add_parser(
        "add", help="add a stock WireGuard peer and print its wg-quick configuration"
    )
    add.add_argument("name", help="the peer's name")
    add.add_argument("-c", "--config", required=True, type=Path, help="the relay's server.toml")
    add.add_argument("--endpoint", help="HOST:PORT the peer dials (default: guessed)")
    add.add_argument(
        "--relay",
        metavar="NAME",
        help="with a shared store: the relay the peer dials, by name (its config file's "
        "name without .toml), with its key and the endpoint it registered "
        "(default: this config's relay)",
    )
    add.add_argument(
        "-o",
        "--output",
        type=Path,
        help="write the configuration to this new file (mode 0600; an existing file or a "
        "symlink is refused)",
    )
    add.add_argument(
        "--qr",
        action="store_true",
        help="print the configuration as a QR code (for the WireGuard phone apps) instead "
        "of as text",
    )
    add.add_argument(
        "--qr-png",
        type=Path,
        metavar="OUT.png",
        help="write the QR code to this new PNG file (mode 0600, as -o)",
    )
    add.add_argument(
        "--no-psk",
        action="store_true",
        help="give the peer no preshared key (default: one of its own, as PresharedKey)",
    )
    add.add_argument(
        "--no-dns",
        action="store_true",
        help="leave out the DNS line (wg-quick needs resolvconf for it; see the README)",
    )

    for command, text in (
        ("remove", "forget a peer `peer add` stored, and its address"),
        ("disable", "keep a stored peer and its address, but serve it no more"),
        ("enable", "serve a disabled peer again"),
    ):
        one = peer_sub.add_parser(command, help=text)
        one.add_argument("name", help="the peer's name")
        one.add_argument("-c", "--config", required=True, type=Path, help="the relay's server.toml")
    quota = peer_sub.add_parser(
        "quota",
        help="set a stored peer's monthly quota (rx+tx, calendar month UTC), or none",
        description=(
            "Set a stored peer's monthly quota: bytes received and sent in a calendar "
            "month (UTC).  The relay disables the peer once it is over, and enables it "
            "again when it is under (a new month, a raised quota)."
        ),
    )
    quota.add_argument("name", help="the peer's name")
    quota.add_argument(
        "size",
        help="bytes, or a number with K, M, G or T (powers of 1024: 50G = 50 GiB), or none",
    )
    quota.add_argument("-c", "--config", required=True, type=Path, help="the relay's server.toml")
    ls = peer_sub.add_parser("list", help="the relay's peers: configured and stored")
    ls.add_argument("-c", "--config", required=True, type=Path, help="the relay's server.toml")

    store = sub.add_parser("store", help="manage the shared store (PostgreSQL)")
    store_sub = store.add_subparsers(dest="store_command", required=True, parser_class=_Parser)
    mig = store_sub.add_parser(
        "migrate", help="create or upgrade the gtun schema in the relay's `store` database"
    )
    mig.add_argument("-c", "--config", required=True, type=Path, help="the relay's server.toml")
    imp = store_sub.add_parser(
        "import",
        help="copy a single relay's SQLite state (peers, leases, endpoints) into the store",
    )
    imp.add_argument("-c", "--config", required=True, type=Path, help="the relay's server.toml")
    imp.add_argument("source", type=Path, help="the relay's state file (state_dir/gtun.sqlite)")

    con = sub.add_parser("console", help="the relay's web console")
    con_sub = con.add_subparsers(dest="console_command", required=True, parser_class=_Parser)
    pw = con_sub.add_parser(
        "passwd", help="set the console's admin password (kept as a scrypt hash in the store)"
    )
    pw.add_argument("-c", "--config", required=True, type=Path, help="the relay's server.toml")
    pw.add_argument(
        "--stdin", action="store_true", help="read the password once from standard input"
    )

    st = sub.add_parser("status", help="ask a running relay or client")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.add_argument("-s", "--socket", type=Path, help="control socket (default: relay's)")

    doc = sub.add_parser("doctor", help="check a relay or a client and say what to fix")
    doc.add_argument("-c", "--config", required=True, type=Path, help="server.toml or client.toml")
    doc.add_argument("--json", action="store_true", help="machine-readable output")
    doc.add_argument("--key", help="(on a relay) say whether this public key is a peer")

    d = sub.add_parser("demo", help="build a lab in namespaces and show traffic (root)")
    d.add_argument("--keep-logs", type=Path, help="copy the processes' logs here")
    return p


def setup_logging(debug: bool, role: str) -> None:
    """Standard error, or the journal's form under systemd (app/logs.py)."""
    from gtun.app.logs import setup_logging as setup

    setup(debug, role)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except GtunError as exc:
        if args.debug:
            raise
        from gtun.app.logs import error_prefix

        print(f"{error_prefix()}gtun: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def dispatch(args: argparse.Namespace) -> int:
    from gtun.app import keys

    if args.command == "genkey":
        print(keys.encode_key(keys.generate_private_key()))
        return 0
    if args.command == "genpsk":
        print(keys.encode_key(keys.generate_preshared_key()))
        return 0
    if args.command == "pubkey":
        text = sys.stdin.read()
        private = keys.decode_key(text, file="<stdin>")
        print(keys.encode_key(keys.public_key(private)))
        return 0
    if args.command == "server":
        from gtun.app.server import run_server

        setup_logging(args.debug, "server")
        run_server(args.config)
        return 0
    if args.command == "client":
        from gtun.app.client import run_client

        setup_logging(args.debug, "client")
        run_client(args.config)
        return 0
    if args.command == "peer":
        if args.peer_command == "add":
            return peer_add(args)
        return peer_manage(args)
    if args.command == "store":
        return store_command(args)
    if args.command == "console":
        return console_passwd(args)
    if args.command == "status":
        return status(args)
    if args.command == "doctor":
        from gtun import doctor

        results = doctor.run(args.config, key=args.key)
        print(doctor.format_json(results) if args.json else doctor.format_text(results))
        return doctor.exit_code(results)
    if args.command == "demo":
        from gtun.lab.demo import run_demo

        return run_demo(keep_logs=args.keep_logs)
    raise ConfigError(f"unknown command {args.command}")


def peer_add(args: argparse.Namespace) -> int:
    from gtun.app.config import load_server_config, parse_host_port
    from gtun.app.peers import add_peer

    cfg = load_server_config(args.config)
    endpoint = None
    if args.endpoint:
        endpoint = parse_host_port(args.endpoint, file="--endpoint", key="endpoint")
    # The output files are made before the peer is stored, so that a file we may not
    # create leaves no peer behind; they are written once it is stored (add_peer's
    # `deliver`: a failure there removes the peer again), and removed if anything fails.
    made: list[tuple[Path, Any]] = []
    try:
        if args.output:
            made.append((args.output, create_private_file(args.output)))
        if args.qr_png:
            made.append((args.qr_png, create_private_file(args.qr_png, binary=True)))

        def deliver(text: str) -> None:
            from gtun.app import qr

            lines = qr.terminal_lines(text, color=sys.stdout.isatty()) if args.qr else None
            for path, f in made:
                try:
                    if path == args.output:
                        f.write(text)
                    else:
                        qr.write_png(text, f)
                    f.close()
                except OSError as exc:
                    raise RuntimeFailure(
                        f"{path}: cannot write it: {exc.strerror or exc}"
                    ) from None
            if lines is not None:
                print("\n".join(lines))
            elif args.output is None:
                print(text)

        _, note = add_peer(
            cfg,
            args.name,
            endpoint,
            args.relay,
            psk=not args.no_psk,
            dns=not args.no_dns,
            deliver=deliver,
        )
    except BaseException:
        for path, f in made:
            f.close()
            path.unlink(missing_ok=True)
        raise
    for path, _ in made:
        print(f"gtun: wrote {path}", file=sys.stderr)
    if note:
        print(f"gtun: peer {args.name} added; {note}", file=sys.stderr)
    return 0


def peer_manage(args: argparse.Namespace) -> int:
    """`gtun peer list|remove|disable|enable|quota`."""
    from gtun.app import peers
    from gtun.app.config import load_server_config

    cfg = load_server_config(args.config)
    if args.peer_command == "list":
        rows = [("NAME", "ADDRESS", "KEPT", "PUBLIC KEY"), *peers.list_peers(cfg)]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
        return 0
    if args.peer_command == "quota":
        size = peers.parse_size(args.size)
        note = peers.set_peer_quota(cfg, args.name, size)
        said = "no quota" if size is None else f"a quota of {peers.format_size(size)}/month"
        print(f"gtun: peer {args.name} has {said}; {note}", file=sys.stderr)
        return 0
    if args.peer_command == "remove":
        note = peers.remove_peer(cfg, args.name)
    else:
        note = peers.set_peer_enabled(cfg, args.name, args.peer_command == "enable")
    done = {"remove": "removed", "disable": "disabled", "enable": "enabled"}[args.peer_command]
    print(f"gtun: peer {args.name} {done}; {note}", file=sys.stderr)
    return 0


def console_passwd(args: argparse.Namespace) -> int:
    """`gtun console passwd`: the new password twice from the terminal, or once from
    standard input with --stdin; its hash goes into the store (every relay of a
    shared store takes the same login)."""
    from gtun.app.config import load_server_config
    from gtun.app.console import auth
    from gtun.app.peerset import open_state

    cfg = load_server_config(args.config)
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        auth.check_new_password(password)
    else:
        import getpass

        password = getpass.getpass("New console password: ")
        auth.check_new_password(password)  # said before asking again
        if getpass.getpass("Again: ") != password:
            raise ConfigError("the two passwords differ; nothing was changed")
    text = auth.hash_password(password)
    store = open_state(cfg)
    try:
        auth.write_admin_hash(store, text)
    finally:
        store.close()
    print(f"gtun: console password set in {store.path}", file=sys.stderr)
    return 0


def store_command(args: argparse.Namespace) -> int:
    """`gtun store migrate` and `gtun store import`: one summary line each."""
    from gtun.app.config import load_server_config
    from gtun.app.keys import encode_key
    from gtun.app.peerset import open_state
    from gtun.app.pgstore import PgStore, migrate, redact
    from gtun.app.store import StateStore

    cfg = load_server_config(args.config)
    if cfg.store is None:
        raise ConfigError(
            'no store is set: add store = "postgresql://..." to [server]',
            file=cfg.path,
            key="server.store",
        )
    if args.store_command == "migrate":
        before, after = migrate(cfg.store)
        where = redact(cfg.store)
        if before == after:
            print(f"gtun: store {where}: schema version {after}, up to date")
        else:
            print(f"gtun: store {where}: schema version {before} -> {after}")
        return 0
    source: Path = args.source
    if not source.is_file():
        raise ConfigError("no such state file", file=source)
    store = open_state(cfg)
    assert isinstance(store, PgStore)
    try:
        with StateStore(source) as old:
            summary = store.import_state(old, encode_key(cfg.public_key))
    finally:
        store.close()
    print(f"gtun: {summary.line(str(source), store.path)}")
    return 0


def create_private_file(path: Path, *, binary: bool = False) -> Any:
    """A new file at `path`, mode 0600, open for writing (text, or bytes if `binary`).
    It must not exist: O_EXCL refuses an existing file (whose wider mode would be kept)
    and any symlink, even a dangling one; O_NOFOLLOW says so again.  Raises ConfigError
    (exit 2)."""
    import os

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(
            "already exists (or is a symlink); remove it or name a new file", file=path
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot create it: {exc.strerror or exc}", file=path) from None
    os.fchmod(fd, 0o600)  # whatever the umask did, the key is for its owner only
    return os.fdopen(fd, "wb" if binary else "w")


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    seconds = max(0, int(time.time() - ts))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def status(args: argparse.Namespace) -> int:
    from gtun.app.control import query

    path = args.socket
    if path is None:
        path = DEFAULT_SERVER_SOCKET if DEFAULT_SERVER_SOCKET.exists() else DEFAULT_CLIENT_SOCKET
    answer = query(path, {"command": "status"})
    if "error" in answer:
        raise RuntimeFailure(f"gtun on {path}: {answer['error']}")
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(
        f"{answer['role']} {answer['device']} {answer.get('address') or '(no address yet)'}"
        + (f" {answer['address6']}" if answer.get("address6") else "")
        + f"  public key {answer['public_key']}"
    )
    if answer["role"] == "client":
        state = "connected" if answer.get("connected") else "not connected"
        routes = ", ".join(answer.get("routes") or []) or "none"
        print(f"  {state}; routes {routes}; dns {', '.join(answer.get('dns') or []) or 'none'}")
        path_mtu = answer.get("path_mtu")
        print(
            f"  mtu {answer.get('mtu') or '-'}; path MTU "
            + (f"{path_mtu} (probed)" if path_mtu else "not probed")
        )
        reach, probe_in = answer.get("reachability"), answer.get("udp_probe_in")
        if reach == "udp_blocked":
            when = f"in {probe_in:.0f}s" if probe_in is not None else "later"
            print(f"  UDP to the relay is blocked: on TCP, trying UDP again {when}")
        elif reach == "no_handshake":
            print(
                "  the relay answers no handshake: is this client's public key a peer of "
                "the relay? (gtun peer add, or [[peers]])"
            )
    workers = answer.get("workers") or []
    if len(workers) > 1:  # a relay of several processes (app/workers.py)
        alive = sum(1 for w in workers if w.get("alive"))
        restarts = sum(w.get("restarts") or 0 for w in workers)
        print(
            f"  {len(workers)} workers, {alive} running"
            + (f", {restarts} restarted" if restarts else "")
        )
    mesh = answer.get("mesh") or []
    here = answer.get("relay_name")
    if mesh:  # several relays: say which holds each peer's session
        names = ", ".join([f"{here} (this one)", *(r["name"] for r in mesh)])
        print(f"  relays of the network: {names}")
    header: tuple[str, ...] = ("NAME", "ADDRESS", "ENDPOINT", "TRANSPORT", "RX", "TX")
    header += ("HANDSHAKE", "PUBLIC KEY") if not mesh else ("HANDSHAKE", "RELAY", "PUBLIC KEY")
    rows = [header]
    for peer in answer["peers"]:
        relay = () if not mesh else (peer.get("relay") or here or "-",)
        rows.append(
            (
                peer["name"],
                ", ".join(a for a in (peer.get("address"), peer.get("address6")) if a) or "-",
                # A peer held at another relay: this relay's endpoint for it is old news.
                peer.get("endpoint") or "-" if not peer.get("relay") else "-",
                peer.get("transport") or "-",
                _bytes(peer["rx_bytes"]),
                _bytes(peer["tx_bytes"]),
                _ago(peer.get("last_handshake")),
                *relay,
                peer["public_key"],
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    for relay in mesh:
        print(
            f"  relay {relay['name']} at {relay.get('endpoint') or '-'}: "
            f"rx {_bytes(relay['rx_bytes'])}, tx {_bytes(relay['tx_bytes'])}, "
            f"handshake {_ago(relay.get('last_handshake'))}"
        )
    refused = answer.get("refused_peers") or []
    if refused:
        print(f"  refused (address pool full, not served): {', '.join(refused)}")
    print_drops(answer)
    return 0


def _counts(drops: dict[str, int] | None) -> str:
    """The non-zero counters as "reason n, ...", or "none"."""
    nonzero = sorted((k, v) for k, v in (drops or {}).items() if v)
    return ", ".join(f"{k} {v}" for k, v in nonzero) or "none"


def print_drops(answer: dict[str, Any]) -> None:
    """The drop counters: the total by reason, then each peer's (kept by the relay)."""
    print(f"  drops: {_counts(answer.get('drops'))}")
    for peer in answer["peers"]:
        if any((peer.get("drops") or {}).values()):
            print(f"  drops from {peer['name']}: {_counts(peer['drops'])}")
