"""The control socket: a Unix stream socket speaking one JSON object per line.

Requests: {"command": "status"} and {"command": "reload"}.  The socket file is mode
0600 (status shows keys and endpoints) and is removed on exit.  A socket file left by a
dead process is replaced; one answered by a live process is an error.

No request crashes or hangs the server: each connection gets one line and one answer
within bounded times (a bad request, or a handler that raised or took too long, is
answered with {"error": ...}), a client that does not read its answer is cut off, and at
most MAX_CONNECTIONS are served at once (more are closed unanswered).
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

from gtun.app.background import off_loop
from gtun.errors import ConfigError, RuntimeFailure

# Tuning knobs.
MAX_REQUEST = 64 * 1024
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 5.0  # to send the request line, and to read the answer
HANDLER_TIMEOUT = 30.0  # a reload may take a while; a status does not
Handler = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]


def socket_answers(path: Path) -> bool:
    """Whether a process answers on the Unix socket at `path` (connect() is accepted)."""
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
        self._active = 0

    async def start(self) -> None:
        """Raises ConfigError when another process answers on the socket."""
        if self.path.exists() or self.path.is_symlink():
            if socket_answers(self.path):
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
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        except OSError as exc:
            raise RuntimeFailure(f"cannot listen on control socket {self.path}: {exc}") from exc
        finally:
            os.umask(old)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._active += 1
        sent = False
        try:
            response = await self._answer(reader)
            # In a worker thread: the status of 10,000 peers takes a while to encode,
            # and the event loop forwards meanwhile.  The answer is the handler's own
            # fresh object, touched by nobody else.
            data = await off_loop(_encode, response)
            writer.write(data)
            await asyncio.wait_for(writer.drain(), timeout=REQUEST_TIMEOUT)
            sent = True
        except (TimeoutError, OSError):
            pass
        finally:
            self._active -= 1
            if sent:
                writer.close()
            else:  # a client that does not read: nothing waits on it
                writer.transport.abort()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        """The answer to the one request line `reader` brings."""
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=REQUEST_TIMEOUT)
            if len(line) > MAX_REQUEST:
                raise ValueError("request too large")
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request is not an object")
        except (TimeoutError, ValueError, RecursionError, asyncio.LimitOverrunError) as exc:
            # ValueError: a line over the reader's limit, not UTF-8, or not JSON.
            return {"error": f"bad request: {exc}"}
        try:
            answer = self.handler(request)
            if inspect.isawaitable(answer):
                # Shielded: a reload that takes too long still finishes, unanswered.
                answer = await asyncio.wait_for(asyncio.shield(answer), HANDLER_TIMEOUT)
        except TimeoutError:
            return {"error": "the request took too long"}
        except Exception as exc:  # noqa: BLE001 - a handler's bug: answered, not fatal
            return {"error": f"internal error: {type(exc).__name__}: {exc}"}
        if not isinstance(answer, dict):
            return {"error": "internal error: the answer is not an object"}
        return answer

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _encode(response: dict[str, Any]) -> bytes:
    try:
        return json.dumps(response).encode() + b"\n"
    except (TypeError, ValueError, RecursionError) as exc:  # the handler's bug
        return json.dumps({"error": f"internal error: {exc}"}).encode() + b"\n"


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
