"""Who calls: a ``Caller`` (a token's name, scopes and ``Limits``), the one
thing the core learns about a call's credentials. The transport finds it
(``lossd_server.grpc.auth.Callers``); the training layer decides with
``Caller.owns`` what a caller may see and change, so this module imports
no gRPC.
"""

from __future__ import annotations

import dataclasses

SCOPES = ("evaluate", "train", "monitor", "admin")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one caller may spend; ``None`` is no per-caller limit (the
    server-wide bounds still hold)."""

    elements_per_second: float | None = None  # tensor elements evaluated, sustained rate
    max_jobs: int | None = None               # training jobs queued or running at once
    max_upload_bytes: int | None = None       # bytes of the caller's stored datasets

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "Limits":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown limits {', '.join(sorted(unknown))}")
        limits = cls(**data)
        for name, value in limits.to_dict().items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        return limits


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who makes a call: the token's name, scopes and limits."""

    name: str
    scopes: frozenset[str]
    limits: Limits = Limits()

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def owns(self, owner: str) -> bool:
        """Whether this caller may see and change what ``owner`` made.

        An admin owns everything. The empty owner (jobs and datasets from
        before owners were recorded, or made on a server without tokens)
        belongs to no token, so only admins see it: the safe reading, as such
        rows may be anyone's.
        """
        return self.admin or owner == self.name


# The caller on a server without a tokens file: today's open behaviour.
ANONYMOUS = Caller("", frozenset(SCOPES))
