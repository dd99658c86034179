"""How the daemons log: one line per message on standard error.

On a terminal or into a file, each line carries the time and the role
("12:00:01 gtun server: ...").  Under systemd, when standard error is the journal, each
line instead starts with its syslog priority, `<3>` for an error to `<7>` for debug
(sd-daemon(3)), and carries no time: journald records its own, and with the priority
`journalctl -p warning` shows the warnings and errors alone.  Standard error is the
journal when `JOURNAL_STREAM` ("device:inode", systemd.exec(5)) names its descriptor;
a mere inherited variable (a shell started from a service, output redirected) does not.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

# Python's levels as syslog priorities (RFC 5424 6.2.1); NOTICE (5) has no Python level.
SYSLOG_PRIORITY = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
DEBUG_PRIORITY = 7


def syslog_priority(levelno: int) -> int:
    for level, priority in SYSLOG_PRIORITY:
        if levelno >= level:
            return priority
    return DEBUG_PRIORITY


def is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether `stream` is the journal systemd connected (JOURNAL_STREAM matches its
    device and inode)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):
        return False


def error_prefix() -> str:
    """What the one line of a failing command starts with: `<3>` (err) when standard
    error is the journal, so that `journalctl -p err` says why a service did not start."""
    return "<3>" if is_journal(sys.stderr, os.environ) else ""


class JournalFormatter(logging.Formatter):
    """`<priority>message`, the priority on every line (a traceback's too: journald
    takes each line as one entry)."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup_logging(
    debug: bool,
    role: str,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Log gtun's messages (INFO, or DEBUG with `debug`) and others' warnings to
    `stream` (standard error), in the journal's form when it is the journal."""
    out = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(out)
    if is_journal(out, os.environ if environ is None else environ):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s gtun {role}: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # Only gtun's own logger gets verbose: pyroute2 logs every netlink message at DEBUG.
    logging.getLogger("gtun").setLevel(logging.DEBUG if debug else logging.INFO)
