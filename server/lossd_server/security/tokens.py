"""Bearer tokens and the tokens file.

A token is ``lsd_<id>_<secret>``. The tokens file (``--tokens-file``) holds
one JSON object per line: the token's ``id``, its caller ``name``, its
``scopes``, its ``limits`` (``Limits``, when it has any) and a salted
SHA-256 of the whole token, never the token itself. The id picks the line,
so a check is one hash whatever the number of tokens; the secret is 32
random bytes, so a fast hash is enough (there is no password to guess), and
the comparison takes constant time.

``lossd tokens create`` appends a line (``create_token``), ``lossd tokens
revoke`` rewrites the file by an atomic replace (``revoke_tokens``), so a
server never reads it half written. A server keeps the file loaded with
``tokens_file``: re-read when it changes, looked at no more than every
``TOKENS_CHECK_SECONDS``, or after SIGHUP; a file that does not parse keeps
the tokens loaded before, with an error line, and a reload never opens the
server. The gRPC interceptor that checks each call's token is
``lossd_server.grpc.auth``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import pathlib
import secrets
import tempfile
from typing import Iterable, Iterator, Optional

from lossd_server.callers import SCOPES, Caller, Limits
from lossd_server.config import StartupError
from lossd_server.security.reload import Reloader

__all__ = ["TOKEN_PREFIX", "TOKENS_CHECK_SECONDS", "Limits", "TokenRecord", "create_token", "find_token",
           "load_tokens", "revoke_tokens", "token_digest", "tokens_file"]

TOKEN_PREFIX = "lsd_"
# A call looks at the tokens file's stamp no more often than this: a removed
# token is refused within it (plus a reload's few milliseconds), and the
# other calls pay one clock read.
TOKENS_CHECK_SECONDS = 0.25


def token_digest(salt: bytes, token: str) -> str:
    """The salted SHA-256 of ``token`` that the tokens file stores: the one
    hash a token check computes."""
    return hashlib.sha256(salt + token.encode()).hexdigest()

@dataclasses.dataclass(frozen=True)
class TokenRecord:
    """One line of the tokens file."""

    id: str
    name: str
    scopes: frozenset[str]
    salt: str
    sha256: str
    limits: Limits = Limits()

    @property
    def caller(self) -> Caller:
        return Caller(self.name, self.scopes, self.limits)

    def matches(self, token: str) -> bool:
        return hmac.compare_digest(token_digest(bytes.fromhex(self.salt), token), self.sha256)


def create_token(path: pathlib.Path, name: str, scopes: Iterable[str], limits: Limits = Limits()) -> str:
    """Appends a new token for ``name`` with ``scopes`` and ``limits`` to the
    tokens file (created with mode 0600) and returns the token, which is
    stored nowhere."""
    scopes = sorted(set(scopes))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ValueError(f"scopes must be some of {', '.join(SCOPES)}; received {', '.join(scopes) or 'none'}")
    if not name or not name.isprintable() or len(name) > 64:
        raise ValueError("a token's name is 1 to 64 printable characters")
    ident, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_bytes(16)
    token = f"{TOKEN_PREFIX}{ident}_{secret}"
    line = {"id": ident, "name": name, "scopes": scopes, "salt": salt.hex(),
            "sha256": token_digest(salt, token)}
    if limits.to_dict():
        line["limits"] = Limits.from_dict(limits.to_dict()).to_dict()
    with _locked(pathlib.Path(path)) as fd:
        os.write(fd, (json.dumps(line) + "\n").encode())
    return token


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[int]:
    """The tokens file opened for appending (created with mode 0600) under an
    exclusive ``flock``, so ``create_token`` and ``revoke_tokens`` run one
    at a time. Revoking replaces the file, so a writer that got the lock on a
    replaced file opens the new one and locks again."""
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                yield fd
                return
        finally:
            os.close(fd)  # also releases the lock


def revoke_tokens(path: pathlib.Path, name: str) -> int:
    """Removes every token of the caller ``name`` from the tokens file and
    returns how many were removed. The file is replaced atomically (same
    mode), so a server re-reading it sees the old or the new one, never a
    part; it refuses the removed tokens from the next change check on.

    Raises:
        ValueError: the file holds no token named ``name``.
        StartupError: the file is not a tokens file.
    """
    path = pathlib.Path(path)
    if not path.exists():
        load_tokens(path)  # says what is missing, and creates nothing
    with _locked(path):
        load_tokens(path)  # the whole file parses: nothing is dropped that we could not read
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.strip() or json.loads(line).get("name") != name]
        removed = len(lines) - len(kept)
        if not removed:
            names = sorted({record.name for record in load_tokens(path).values()})
            raise ValueError(f"{path} has no token named {name!r}; it has: {', '.join(names) or 'none'}")
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temporary, path.stat().st_mode & 0o777)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
    return removed


def load_tokens(path: pathlib.Path) -> dict[str, TokenRecord]:
    """The tokens file, by id.

    Raises:
        StartupError: the file is missing or a line is malformed (the line
            number is named; no token is shown).
    """
    records = {}
    try:
        lines = pathlib.Path(path).read_text().splitlines()
    except OSError as exc:
        raise StartupError(f"cannot read the tokens file {pathlib.Path(path).name}: {exc.strerror} "
                           "(set LOSSD_TOKENS_FILE or --tokens-file)") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            record = TokenRecord(str(data["id"]), str(data["name"]), frozenset(data["scopes"]),
                                 str(data["salt"]), str(data["sha256"]), Limits.from_dict(data.get("limits", {})))
            bytes.fromhex(record.salt)
            if not record.scopes <= set(SCOPES):
                raise ValueError("unknown scope")
        except (ValueError, KeyError, TypeError) as exc:
            raise StartupError(f"line {number} of the tokens file is not a token record ({exc}); "
                               "make tokens with `lossd tokens create`") from None
        records[record.id] = record
    return records


def tokens_file(path: pathlib.Path, check_seconds: float = TOKENS_CHECK_SECONDS
                ) -> Reloader[dict[str, TokenRecord]]:
    """The tokens file ``path`` by id (``value``), kept up to date with it:
    re-read when it changes (looked at no more than every ``check_seconds``)
    or after ``reload()``.

    Raises:
        StartupError: the file is missing or a line is malformed.
    """
    path = pathlib.Path(path)
    return Reloader([path], lambda: load_tokens(path), what="tokens file", errors=(StartupError,),
                    every=check_seconds, describe=lambda tokens: f" ({len(tokens)} token(s))")


def find_token(tokens: dict[str, TokenRecord], token: str) -> Optional[TokenRecord]:
    """The record of ``tokens`` that ``token`` is, or None: its id picks the
    line, and one hash checks it."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    record = tokens.get(token[len(TOKEN_PREFIX):].partition("_")[0])
    return record if record is not None and record.matches(token) else None
