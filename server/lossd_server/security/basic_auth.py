"""HTTP basic auth for the ``/metrics`` endpoint, and its users.

``BasicAuth`` checks ``Authorization: Basic`` against a file of
``user:pbkdf2_sha256$<iterations>$<salt>$<hash>`` lines (the salt and hash in
unpadded URL-safe base64), made by ``lossd metrics-auth create``; the file is
re-read when it changes (``security.reload.Reloader``). PBKDF2 because Prometheus sends the password itself on
every scrape, so the file must not hold it, and an operator may choose a weak
one. A scrape that repeats a verified password costs one HMAC, not the PBKDF2,
also after the file was re-read if that user's line did not change.

A password that needs its PBKDF2 and fails counts against the client's
address: past ``FAILURE_BURST`` failures, an address gets one more check per
``FAILURE_SECONDS`` and ``LIMITED`` (429) for the rest, without hashing. A
valid scrape that repeats a verified password is never limited, so a flood of
wrong passwords from Prometheus's own address does not slow its scrapes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
import pathlib
import secrets
import threading
import time
from typing import Optional

from lossd_server.security.reload import Reloader, SecurityFileError


SCHEME = "pbkdf2_sha256"
# OWASP's 2023 figure for PBKDF2-HMAC-SHA256; about 0.15 s on one core here,
# paid once per password a scraper sends, not per scrape.
ITERATIONS = 600_000
REALM = "lossd metrics"
# Failed PBKDF2 checks an address may make at once; then one more after
# FAILURE_SECONDS, the wait doubling with each further failure up to
# FAILURE_MAX_SECONDS; an address without a failure for FAILURE_FORGET_SECONDS
# (or that logs in) starts afresh. A flood from one address costs a few
# PBKDF2s, then one every FAILURE_MAX_SECONDS: bench/scrapes.py measured a
# steady one per 10 s still costing Evaluate a tenth of its rate.
FAILURE_BURST = 5
FAILURE_SECONDS = 10.0
FAILURE_MAX_SECONDS = 300.0
FAILURE_FORGET_SECONDS = 3600.0
# Addresses whose failures are remembered; a full table forgets the oldest.
FAILURE_ADDRESSES = 10_000
# What BasicAuth.check answers for an address over its budget of failures.
LIMITED = "<limited>"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: Optional[bytes] = None) -> str:
    """``pbkdf2_sha256$<iterations>$<salt>$<hash>`` of ``password``."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def create_user(path: pathlib.Path, user: str) -> str:
    """Appends ``user`` with a new random password to the basic-auth file
    (created with mode 0600) and returns the password, which is stored nowhere."""
    _check_user(user)
    existing = parse_users(pathlib.Path(path).read_text(), str(path)) if pathlib.Path(path).exists() else {}
    if user in existing:
        raise ValueError(f"{path} already has a user {user!r}: remove its line to replace it")
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{user}:{hash_password(password)}\n")
    return password


def _check_user(user: str) -> None:
    if not user or ":" in user or not user.isprintable() or user != user.strip() or len(user) > 64:
        raise ValueError(f"a metrics user name is 1 to 64 printable characters without ':' or surrounding "
                         f"spaces; received {user!r}")


# Hash formats an operator may bring from elsewhere, named in the error when
# seen; anything else is not echoed, as it may be a plain-text password.
_OTHER_SCHEMES = ("pbkdf2_sha1", "pbkdf2_sha512", "sha256", "sha512", "md5", "argon2", "argon2id", "scrypt")


def _kind(hashed: str) -> str:
    if hashed.startswith(("$2a$", "$2b$", "$2y$")):
        return "a bcrypt hash (not supported)"
    if "$" in hashed and hashed.split("$")[0] in _OTHER_SCHEMES:
        return f"a {hashed.split('$')[0]} hash (not supported)"
    return "something else"


def parse_users(text: str, where: str) -> dict[str, tuple[int, bytes, bytes]]:
    """``user -> (iterations, salt, hash)`` from a basic-auth file's text.

    Raises:
        SecurityFileError: a line is not ``user:pbkdf2_sha256$...`` (its
            number is named; nothing of the line is shown).
    """
    users = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, _, hashed = line.strip().partition(":")
        parts = hashed.split("$")
        try:
            _check_user(user)
            if len(parts) != 4 or parts[0] != SCHEME:
                raise ValueError(f"expected user:{SCHEME}$<iterations>$<salt>$<hash>, received {_kind(hashed)}")
            iterations = int(parts[1])
            if iterations < 1:
                raise ValueError(f"iterations must be positive, received {iterations}")
            salt, digest = _unb64(parts[2]), _unb64(parts[3])
            if len(digest) != 32:
                raise ValueError(f"a SHA-256 hash has 32 bytes, received {len(digest)}")
        except (ValueError, binascii.Error) as exc:
            raise SecurityFileError(f"line {number} of the metrics basic-auth file {where} is not a user: "
                                    f"{exc}; make users with `lossd metrics-auth create NAME --file FILE`") from None
        if user in users:
            raise SecurityFileError(f"line {number} of the metrics basic-auth file {where} repeats the user "
                                    f"{user!r}")
        users[user] = (iterations, salt, digest)
    if not users:
        raise SecurityFileError(f"the metrics basic-auth file {where} has no user; make one with "
                                "`lossd metrics-auth create NAME --file FILE`")
    return users


class BasicAuth:
    """Checks HTTP basic credentials against a basic-auth file, re-read when it changes.

    Raises:
        SecurityFileError: the file cannot be read or a line is malformed, at construction.
    """

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        self._lock = threading.Lock()
        # One PBKDF2 at a time: guesses queue up instead of taking every core.
        self._hashing = threading.Lock()
        # A per-process key: the HMAC of a password verified once stands in for
        # its PBKDF2 on the next scrapes, and is worthless outside this process.
        self._key = secrets.token_bytes(32)
        # user -> (HMAC of the verified password, the user's line it was verified against)
        self._verified: dict[str, tuple[bytes, tuple[int, bytes, bytes]]] = {}
        self._failures = _FailureBudget()
        try:
            self._users = Reloader((self.path,), lambda: parse_users(self.path.read_text(), self.path.name),
                                   what="metrics basic-auth file", errors=(OSError, SecurityFileError),
                                   describe=lambda users: f" ({len(users)} users)")
        except OSError as exc:
            raise SecurityFileError(f"cannot read the metrics basic-auth file {self.path.name}: {exc.strerror} "
                                    "(set LOSSD_METRICS_BASIC_AUTH_FILE or --metrics-basic-auth-file)") from exc
        # Unknown users cost the same PBKDF2 as known ones.
        self._dummy = (ITERATIONS, secrets.token_bytes(16), secrets.token_bytes(32))

    def retry_after(self, address: str) -> int:
        """Whole seconds until ``address``, refused as ``LIMITED``, may try a password again."""
        return max(1, math.ceil(self._failures.wait(address)))

    def check(self, authorization: str, address: str = "") -> Optional[str]:
        """The user an ``Authorization`` header value authenticates, None, or
        ``LIMITED`` when ``address`` is over its budget of failed checks and
        the password is not one verified before."""
        scheme, _, encoded = (authorization or "").strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        if not sep:
            return None
        users = self._users.current()
        entry = users.get(user)
        tag = hmac.new(self._key, password.encode(), hashlib.sha256).digest()
        with self._lock:
            remembered = self._verified.get(user)
        if remembered is not None and hmac.compare_digest(remembered[0], tag) and remembered[1] == entry:
            return user
        if not self._failures.allows(address):
            return LIMITED
        iterations, salt, digest = entry or self._dummy
        with self._hashing:
            candidate = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
        if not (hmac.compare_digest(candidate, digest) and entry is not None):
            self._failures.failed(address)
            return None
        self._failures.succeeded(address)
        with self._lock:
            self._verified[user] = (tag, entry)
        return user


class _FailureBudget:
    """Failed password checks per client address: ``FAILURE_BURST`` at
    once, then one more each time a wait has passed since the last failure,
    the wait doubling from ``FAILURE_SECONDS`` with each failure past the
    burst, up to ``FAILURE_MAX_SECONDS``. ``clock`` is the time source."""

    def __init__(self, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # address -> (failures, last at), oldest first

    def _current(self, address: str, now: float) -> tuple[int, float]:
        failures, at = self._failures.get(address, (0, now))
        return (0, now) if now - at >= FAILURE_FORGET_SECONDS else (failures, at)

    def wait(self, address: str) -> float:
        """Seconds until ``address`` may have a password hashed (0: now)."""
        now = self._clock()
        with self._lock:
            failures, at = self._current(address, now)
        if failures < FAILURE_BURST:
            return 0.0
        pause = min(FAILURE_SECONDS * 2 ** min(failures - FAILURE_BURST, 16), FAILURE_MAX_SECONDS)
        return max(0.0, at + pause - now)

    def allows(self, address: str) -> bool:
        """Whether ``address`` may have a password hashed now."""
        return self.wait(address) == 0.0

    def failed(self, address: str) -> None:
        now = self._clock()
        with self._lock:
            failures, _ = self._current(address, now)
            self._failures.pop(address, None)  # re-inserted last: the table stays oldest first
            self._failures[address] = (failures + 1, now)
            while len(self._failures) > FAILURE_ADDRESSES:
                del self._failures[next(iter(self._failures))]

    def succeeded(self, address: str) -> None:
        """A password from ``address`` verified: its failures are forgiven."""
        with self._lock:
            self._failures.pop(address, None)
