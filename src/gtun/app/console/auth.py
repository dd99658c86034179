"""The console's admin login: the scrypt hash kept in the store, sessions held in
memory, CSRF tokens, and the limits on failed logins.

The hash is `scrypt$n$r$p$salt$hash` (base64 salt and hash) in the store's setting
ADMIN_SETTING, so every relay of a shared store takes the same password; a running
console reads it at each login.  Sessions live in this process only: a restart logs
everyone out.  Nothing here does I/O but the two store calls; hashing is CPU work
the console runs off the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gtun.errors import ConfigError

ADMIN_SETTING = "console_admin"
MIN_PASSWORD = 10  # characters
# scrypt's cost: RFC 7914 section 2 and OWASP's minimum (n=2**15 with r=8 uses 32 MiB).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
SALT_BYTES = 16
HASH_BYTES = 32

# Tuning knobs.
MAX_SESSIONS = 64  # the oldest goes when one more logs in
SESSION_LIFETIME = 12 * 3600.0  # seconds from login, whatever happens
SESSION_IDLE = 3600.0  # seconds without a request
FAILS_PER_ADDRESS = 5  # failed logins from one address ...
FAIL_WINDOW = 300.0  # ... within this many seconds, then 429
FAILS_PER_MINUTE = 20  # failed logins from everyone within 60 s, then 429
# Logins checked at once (each is 32 MiB and ~0.1 s of scrypt in a worker thread); more
# get 429 at once: the limits above count failures only once checked, so a burst of
# concurrent attempts would otherwise all reach scrypt and fill the worker threads that
# the relay's own background work (the traffic fold, health) shares.
MAX_VERIFYING = 2


class SettingsStore(Protocol):
    """The two store calls the admin hash needs (app/store.py's Store has them)."""

    def get_setting(self, name: str) -> str | None: ...
    def set_setting(self, name: str, value: str) -> None: ...


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """The stored form of `password`: scrypt$n$r$p$salt$hash."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=HASH_BYTES
    )


def verify_password(password: str, stored: str | None) -> bool:
    """Whether `password` matches the stored hash; False for no hash or a malformed
    one (never raises for bad input).  CPU-heavy: call it off the event loop."""
    if not stored:
        return False
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        return False
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt = base64.b64decode(parts[4], validate=True)
        want = base64.b64decode(parts[5], validate=True)
        if not (1 < n <= 2**20 and 0 < r <= 32 and 0 < p <= 16) or not want:
            return False
        got = hashlib.scrypt(
            password.encode(), salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=len(want)
        )
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(got, want)


def check_new_password(password: str) -> None:
    """Raises ConfigError for a password too short to keep."""
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"the password must be at least {MIN_PASSWORD} characters long")


def read_admin_hash(store: SettingsStore) -> str | None:
    """The admin's stored hash, or None when `gtun console passwd` was never run."""
    return store.get_setting(ADMIN_SETTING)


def write_admin_hash(store: SettingsStore, text: str) -> None:
    """Keep `text` (hash_password's answer) as the admin's hash."""
    store.set_setting(ADMIN_SETTING, text)


@dataclass
class Session:
    token: str  # the cookie's value
    csrf: str  # what X-CSRF-Token must say on a change
    created: float
    used: float


@dataclass
class Sessions:
    """The logged-in sessions, by cookie token; `clock` is injectable for tests."""

    clock: Callable[[], float] = time.monotonic
    _by_token: dict[str, Session] = field(default_factory=dict)

    def _now(self) -> float:
        return self.clock()

    def create(self) -> Session:
        now = self._now()
        self._expire(now)
        while len(self._by_token) >= MAX_SESSIONS:
            oldest = min(self._by_token.values(), key=lambda s: s.created)
            del self._by_token[oldest.token]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        self._by_token[session.token] = session
        return session

    def get(self, token: str | None) -> Session | None:
        """The live session of `token` (its idle time restarted), or None."""
        if not token:
            return None
        session = self._by_token.get(token)
        if session is None:
            return None
        now = self._now()
        if now - session.created > SESSION_LIFETIME or now - session.used > SESSION_IDLE:
            del self._by_token[token]
            return None
        session.used = now
        return session

    def drop(self, token: str | None) -> None:
        if token:
            self._by_token.pop(token, None)

    def __len__(self) -> int:
        return len(self._by_token)

    def _expire(self, now: float) -> None:
        for token, s in list(self._by_token.items()):
            if now - s.created > SESSION_LIFETIME or now - s.used > SESSION_IDLE:
                del self._by_token[token]


@dataclass
class LoginLimiter:
    """Failed logins remembered for the limits: FAILS_PER_ADDRESS from one address in
    FAIL_WINDOW, FAILS_PER_MINUTE from everyone in 60 s.  Bounded: at most
    FAILS_PER_ADDRESS times per address, and addresses forgotten after the window."""

    clock: Callable[[], float] = time.monotonic
    _by_address: dict[str, deque[float]] = field(default_factory=dict)
    _everyone: deque[float] = field(default_factory=deque)

    def _now(self) -> float:
        return self.clock()

    def retry_after(self, address: str) -> int:
        """Seconds until `address` may try again; 0: now."""
        now = self._now()
        self._prune(now)
        wait = 0.0
        fails = self._by_address.get(address)
        if fails is not None and len(fails) >= FAILS_PER_ADDRESS:
            wait = fails[0] + FAIL_WINDOW - now
        if len(self._everyone) >= FAILS_PER_MINUTE:
            wait = max(wait, self._everyone[0] + 60.0 - now)
        return max(0, int(wait + 0.999)) if wait > 0 else 0

    def failed(self, address: str) -> None:
        now = self._now()
        fails = self._by_address.setdefault(address, deque(maxlen=FAILS_PER_ADDRESS))
        fails.append(now)
        self._everyone.append(now)
        while len(self._everyone) > FAILS_PER_MINUTE:
            self._everyone.popleft()

    def _prune(self, now: float) -> None:
        while self._everyone and now - self._everyone[0] > 60.0:
            self._everyone.popleft()
        for address, fails in list(self._by_address.items()):
            while fails and now - fails[0] > FAIL_WINDOW:
                fails.popleft()
            if not fails:
                del self._by_address[address]
