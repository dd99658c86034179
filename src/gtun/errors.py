"""Errors a user sees.  They are translated into one line and an exit code at the
CLI edge (gtun.cli); nothing below the edge prints or exits.

- ConfigError: the user's input is wrong (config file, key file, flag).  Exit 2.
- RuntimeFailure: something failed while running (device, socket, netlink).  Exit 1.
"""

from __future__ import annotations

from pathlib import Path


class GtunError(Exception):
    """Base class of the errors that reach the user as one line."""

    exit_code = 1


class ConfigError(GtunError):
    """Bad usage or bad configuration: names the file, key and what is wrong."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = str(file) if file is not None else None
        self.key = key
        self.line = line

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        if self.key:
            where += f"{self.key}: "
        return where + self.message


class RuntimeFailure(GtunError):
    """A failure at run time (not the user's input): exit 1."""

    exit_code = 1
