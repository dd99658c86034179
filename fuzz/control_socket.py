#!/usr/bin/env python3
"""Fuzz the control socket's request handling (gtun.app.control.ControlServer._serve)
with an in-memory StreamReader and writer: one request line, as a local client sends it.

Oracle: _serve never raises; it answers with exactly one line, a JSON object; a first
line that is a JSON object within the size limit reaches the handler unchanged, and
anything else is answered with an error, not passed on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import atheris
import common  # noqa: F401  (this tree's src/ first)

with atheris.instrument_imports():
    from gtun.app.control import MAX_REQUEST, ControlServer

import oracles
from common import main


class Writer:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        oracles.check(not self.closed, "write after close")
        self.data += data

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


class Handler:
    """What the daemons do with a request: look at its command."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        self.seen.append(request)
        command = request.get("command")
        if command == "status":
            return {"peers": [], "drops": {}}
        if command == "reload":
            return {"ok": True, "added": [], "removed": []}
        return {"error": f"unknown command {command!r}"}


LOOP = asyncio.new_event_loop()


def test_one(data: bytes) -> None:
    handler = Handler()
    server = ControlServer(Path("/nonexistent/gtun-fuzz.sock"), handler)
    reader = asyncio.StreamReader(loop=LOOP)
    reader.feed_data(data)
    reader.feed_eof()
    writer = Writer()
    LOOP.run_until_complete(server._serve(reader, writer))  # type: ignore[arg-type]
    oracles.check(writer.closed, "connection left open")
    oracles.check(writer.data.count(b"\n") == 1 and writer.data.endswith(b"\n"), "not one line")
    answer = json.loads(writer.data)
    oracles.check(isinstance(answer, dict), "answer is not an object")
    line = data.split(b"\n", 1)[0]
    try:
        request = json.loads(line) if len(line) < min(MAX_REQUEST, 2**16) else None
    except ValueError:
        request = None
    if isinstance(request, dict):
        same = json.dumps(handler.seen) == json.dumps([request])
        oracles.check(same, "request not passed on unchanged")
    else:
        oracles.check(handler.seen == [], "a bad request reached the handler")
        oracles.check("error" in answer, "a bad request was not answered with an error")


if __name__ == "__main__":
    main(test_one)
