"""Tier 2: the control socket under bad clients, on a real Unix socket in a temporary
directory: no request crashes or hangs the server, and connections are bounded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gtun.app import control
from gtun.app.control import ControlServer


async def handler(request: dict[str, Any]) -> dict[str, Any]:
    command = request.get("command")
    if command == "slow":
        await asyncio.sleep(60)
    if command == "boom":
        raise RuntimeError("a bug in the handler")
    if command == "big":
        return {"data": "x" * (16 << 20)}  # more than any socket buffer holds
    if command == "odd":
        return {"data": object()}  # not JSON
    return {"ok": command}


async def ask(path: Path, line: bytes) -> dict[str, Any] | None:
    """Send one line; the answer, or None when the server closed without one."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(line)
    await writer.drain()
    try:
        data = await asyncio.wait_for(reader.readline(), timeout=10.0)
    except ConnectionResetError:  # closed with our request unread
        data = b""
    finally:
        writer.close()
    return json.loads(data) if data else None


def serve(tmp_path: Path, body: Any) -> None:
    async def main() -> None:
        server = ControlServer(tmp_path / "ctl.sock", handler)
        await server.start()
        try:
            await asyncio.wait_for(body(server), timeout=30.0)
        finally:
            await server.close()

    asyncio.run(main())


def test_bad_requests_are_answered_and_the_server_keeps_serving(tmp_path: Path) -> None:
    async def body(server: ControlServer) -> None:
        path = server.path
        for line in (
            b"[" * 50_000 + b"\n",  # deeper than the JSON decoder goes
            b"\xff\xfe\n",  # not UTF-8
            b'{"n": ' + b"1" * 5000 + b"}\n",  # more digits than int() converts
            b"[1]\n",
            b"x" * (control.MAX_REQUEST + 10) + b"\n",
            b'{"command": "boom"}\n',
            b'{"command": "odd"}\n',
        ):
            answer = await ask(path, line)
            assert answer is not None and "error" in answer, line[:20]
        assert await ask(path, b'{"command": "status"}\n') == {"ok": "status"}
        assert server._active == 0

    serve(tmp_path, body)


def test_a_client_that_never_reads_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.3)

    async def body(server: ControlServer) -> None:
        reader, writer = await asyncio.open_unix_connection(str(server.path))
        writer.write(b'{"command": "big"}\n')
        await writer.drain()
        for _ in range(100):  # the server gives up on it within a bounded time
            await asyncio.sleep(0.05)
            if server._active == 0:
                break
        assert server._active == 0
        writer.close()
        assert await ask(server.path, b'{"command": "status"}\n') == {"ok": "status"}

    serve(tmp_path, body)


def test_connections_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.5)

    async def body(server: ControlServer) -> None:
        idle = [
            await asyncio.open_unix_connection(str(server.path))
            for _ in range(control.MAX_CONNECTIONS)
        ]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if server._active == control.MAX_CONNECTIONS:
                break
        assert server._active == control.MAX_CONNECTIONS
        # One more is closed at once, unanswered.
        assert await ask(server.path, b'{"command": "status"}\n') is None
        # The idle ones time out and are answered with an error; then all is well.
        for reader, writer in idle:
            answer = json.loads(await asyncio.wait_for(reader.readline(), timeout=10.0))
            assert "error" in answer
            writer.close()
        assert await ask(server.path, b'{"command": "status"}\n') == {"ok": "status"}

    serve(tmp_path, body)


def test_a_handler_that_takes_too_long_is_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "HANDLER_TIMEOUT", 0.2)

    async def body(server: ControlServer) -> None:
        answer = await ask(server.path, b'{"command": "slow"}\n')
        assert answer is not None and "too long" in answer["error"]
        assert await ask(server.path, b'{"command": "status"}\n') == {"ok": "status"}
        assert server._active == 0

    serve(tmp_path, body)
