"""A wg-quick configuration as a QR code, for the WireGuard phone apps ("scan from QR
code"): drawn in the terminal with UTF-8 half blocks, or written as a PNG.  The code
itself is segno's (pure Python, no imaging library)."""

from __future__ import annotations

from typing import BinaryIO

import segno

from gtun.errors import ConfigError

BORDER = 4  # the quiet zone a reader needs around the code, in modules (ISO/IEC 18004)
PNG_SCALE = 8  # pixels per module
# Light modules are drawn, two rows of modules per line of text: (top, bottom) light.
_HALF_BLOCKS = {(True, True): "█", (True, False): "▀", (False, True): "▄", (False, False): " "}
# White on black, as `qrencode -t ansiutf8` draws: the drawn (light) modules are white and
# the rest black whatever the terminal's colours, so a camera sees dark on light.
_ANSI_ON, _ANSI_OFF = "\x1b[40;97m", "\x1b[0m"


def make(text: str) -> segno.QRCode:
    """The QR code of `text` (the smallest version that holds it, error correction
    raised as far as that version allows).  Raises ConfigError when it is too long for
    any QR code (about 2900 bytes: a configuration with very many AllowedIPs)."""
    try:
        return segno.make(text, micro=False, boost_error=True)
    except segno.DataOverflowError:
        raise ConfigError(
            f"the configuration ({len(text.encode())} bytes) is too long for a QR code; "
            "use the file (-o) instead"
        ) from None


def terminal_lines(text: str, *, color: bool) -> list[str]:
    """The QR code of `text` as lines of UTF-8 half blocks, a quiet zone around it.
    With `color`, each line sets white on black itself (for a terminal whatever its
    theme); without, light modules are the drawn ones, for a light-on-dark terminal."""
    rows = [[not dark for dark in row] for row in make(text).matrix_iter(border=BORDER)]
    if len(rows) % 2:
        rows.append([True] * len(rows[0]))  # the quiet zone goes on below
    lines = []
    for top, bottom in zip(rows[::2], rows[1::2], strict=True):
        line = "".join(_HALF_BLOCKS[pair] for pair in zip(top, bottom, strict=True))
        lines.append(f"{_ANSI_ON}{line}{_ANSI_OFF}" if color else line)
    return lines


def write_png(text: str, out: BinaryIO) -> None:
    """Write the QR code of `text` to `out` as a PNG (black on white)."""
    make(text).save(out, kind="png", scale=PNG_SCALE, border=BORDER)
