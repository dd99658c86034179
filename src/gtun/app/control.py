"""The control socket: a Unix stream socket speaking one JSON object per line.

Requests: {"command": "status"} and {"command": "reload"}.  The socket file is mode
0600 (status shows keys and endpoints) and is removed on exit.  A socket file left by a
dead process is replaced; one answered by a live process is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gtun.errors import ConfigError, RuntimeFailure

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]


def _alive(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class ControlServer:
    def __init__(self, path: Path, handler: Handler, *, config_file: Path | None = None) -> None:
        self.path = path
        self.handler = handler
        self.config_file = config_file
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Raises ConfigError when another process answers on the socket."""
        if self.path.exists() or self.path.is_symlink():
            if _alive(self.path):
                raise ConfigError(
                    f"control socket {self.path} is in use: is another gtun running?",
                    file=self.config_file,
                    key="control_socket",
                )
            self.path.unlink()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RuntimeFailure(f"cannot create {self.path.parent}: {exc.strerror}") from exc
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        except OSError as exc:
            raise RuntimeFailure(f"cannot listen on control socket {self.path}: {exc}") from exc
        finally:
            os.umask(old)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5.0)
            if len(line) > MAX_REQUEST:
                raise ValueError("request too large")
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request is not an object")
            answer = self.handler(request)
            response = await answer if inspect.isawaitable(answer) else answer
        except (TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
            response = {"error": f"bad request: {exc}"}
        try:
            writer.write(json.dumps(response).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), timeout=5.0)
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def query(path: Path, request: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running gtun.  Raises RuntimeFailure when nobody answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except FileNotFoundError as exc:
        raise RuntimeFailure(f"no gtun is running here: {path} does not exist") from exc
    except ConnectionRefusedError as exc:
        raise RuntimeFailure(f"no gtun answers on {path} (stale socket)") from exc
    except PermissionError as exc:
        raise RuntimeFailure(f"permission denied on {path}: run as root") from exc
    except OSError as exc:
        raise RuntimeFailure(f"cannot talk to gtun on {path}: {exc}") from exc
    finally:
        s.close()
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise RuntimeFailure(f"gtun on {path} gave a garbled answer") from exc
    if not isinstance(answer, dict):
        raise RuntimeFailure(f"gtun on {path} gave a garbled answer")
    return answer
