"""Lease owners: who holds a claim in the ledger, and whether that holder can be seen to be dead.

A lease is an owner id plus an expiry time. An expired lease may be taken over by anyone; a lease
whose owner is a process on this host (and in this pid namespace) that no longer exists may be taken
over at once, so a watcher killed with SIGKILL is replaced without waiting for the expiry.

    owner = make_owner_id()                  # "vm:4026531836:4242:9f1c2ab3d4e5f607"
    lease_reclaimable(owner, expires_at=t, now=time.time())
"""

from __future__ import annotations

import dataclasses
import enum
import os
import secrets
import socket

_SEPARATOR = ":"


class LeaseClaim(enum.Enum):
    """The outcome of claiming a lease; true when the claimant now holds it."""

    ACQUIRED = "acquired"  # held now, and someone else (or nobody) held it before
    RENEWED = "renewed"  # held before by the same owner, without a break
    REFUSED = "refused"  # another live owner holds it

    def __bool__(self) -> bool:
        return self is not LeaseClaim.REFUSED


@dataclasses.dataclass(frozen=True)
class OwnerId:
    """The parts of an owner id made by `make_owner_id`.

    Attributes:
      host: the host name.
      pid_namespace: the Linux pid namespace inode ("" where unknown); two containers that share a
        host name but not a pid namespace must not judge each other's pids.
      pid: the owning process id.
      token: random hex, so two owners in one process (or a reused pid) never compare equal.
    """

    host: str
    pid_namespace: str
    pid: int
    token: str

    def __str__(self) -> str:
        return _SEPARATOR.join((self.host, self.pid_namespace, str(self.pid), self.token))


def _pid_namespace() -> str:
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return ""
    return link.partition("[")[2].rstrip("]")


def make_owner_id(*, pid: int | None = None) -> str:
    """Returns a fresh owner id for this process: host, pid namespace, pid and a random token.

    Args:
      pid: the process id to name; defaults to the calling process.

    Returns:
      A string such as ``"vm:4026531836:4242:9f1c2ab3d4e5f607"``.
    """
    host = socket.gethostname().replace(_SEPARATOR, "_")
    return str(OwnerId(host, _pid_namespace(), os.getpid() if pid is None else pid, secrets.token_hex(8)))


def parse_owner_id(owner: str) -> OwnerId | None:
    """Returns the parts of an owner id, or None for a free-form owner (such as ``"trainer-0"``)."""
    parts = owner.rsplit(_SEPARATOR, 3)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return OwnerId(parts[0], parts[1], int(parts[2]), parts[3])


def owner_is_dead(owner: str) -> bool:
    """Whether the owner is known to be dead: a process of this host and pid namespace that is gone.

    Owners on other hosts, in other pid namespaces or with free-form ids are never judged dead here;
    their leases end only by expiry. A reused pid makes a dead owner look alive, which only delays
    the takeover until expiry.

    Args:
      owner: an owner id, usually from `make_owner_id`.

    Returns:
      True only when the owner's death is certain.
    """
    parsed = parse_owner_id(owner)
    if parsed is None or parsed.pid <= 0:
        return False
    if parsed.host != socket.gethostname().replace(_SEPARATOR, "_"):
        return False
    if parsed.pid_namespace != _pid_namespace():
        return False
    try:
        os.kill(parsed.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user
        return False
    return False


def lease_reclaimable(owner: str | None, *, expires_at: float | None, now: float) -> bool:
    """Whether a lease may be taken over by someone else.

    Args:
      owner: the current holder, or None when nobody holds it.
      expires_at: unix time at which the lease ends, or None when nobody holds it.
      now: the current unix time.

    Returns:
      True when nobody holds the lease, it has expired, or its holder is known to be dead.
    """
    if owner is None or expires_at is None:
        return True
    return expires_at <= now or owner_is_dead(owner)
