# -*- test-case-name: tests.unit.test_errors -*-
"""Exceptions that carry their reply.

``MailError`` is the root.  ``ReplyError`` carries the :class:`~mailserver.reply.Reply`
the client should see; ``TempFailure`` and ``PermFailure`` say which class it is.
``ProtocolError`` is raised by the sans-IO cores when the peer breaks the
protocol.  :func:`to_reply` is the single place where any exception becomes a
reply: anything not a ``ReplyError`` becomes ``451 4.3.0`` and the caller logs
the traceback.  Exception text never reaches a client.
"""

from __future__ import annotations

from typing import Optional

from mailserver import reply as R
from mailserver.reply import Reply


class MailError(Exception):
    """Base of every mailserver exception."""


class ReplyError(MailError):
    """An error that knows the reply the client should get."""

    def __init__(self, reply: Reply, reason: str = "") -> None:
        super().__init__(reason or reply.text)
        self.reply = reply
        self.reason = reason


class TempFailure(ReplyError):
    """A temporary failure: the client should retry later (4xx)."""

    def __init__(self, reply: Reply, reason: str = "") -> None:
        if not reply.is_temporary:
            raise ValueError(f"TempFailure needs a 4xx reply, got {reply.code}")
        super().__init__(reply, reason)


class PermFailure(ReplyError):
    """A permanent failure (5xx)."""

    def __init__(self, reply: Reply, reason: str = "") -> None:
        if not reply.is_permanent:
            raise ValueError(f"PermFailure needs a 5xx reply, got {reply.code}")
        super().__init__(reply, reason)


class DirectoryUnavailable(TempFailure):
    """The user directory could not answer (server down, timeout)."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(R.DIRECTORY_UNAVAILABLE, reason)


class ProtocolError(MailError):
    """The peer broke the protocol; ``reply`` is what to tell it."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


class ConfigError(MailError):
    """The configuration is invalid: ``str(exc)`` names file, key and problem."""

    def __init__(self, path: str, key: Optional[str], problem: str) -> None:
        self.path = path
        self.key = key
        self.problem = problem
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + problem)


def to_reply(exc: BaseException, queue_id: Optional[str] = None) -> Reply:
    """The reply for ``exc``; unknown exceptions become ``451 4.3.0``.

    The caller must log unknown exceptions with their traceback; this function
    only decides what the client sees.
    """
    if isinstance(exc, (ReplyError, ProtocolError)):
        return exc.reply
    if isinstance(exc, OSError) and exc.errno in (28, 122):  # ENOSPC, EDQUOT
        return R.STORAGE_FULL
    text = R.INTERNAL_ERROR.text
    if queue_id:
        text = f"{text} ({queue_id})"
    return R.INTERNAL_ERROR.with_text(text)


def is_known(exc: BaseException) -> bool:
    """True when ``exc`` needs no traceback in the logs: it carries its own
    reply, or it is a full disk or quota (an operational fault, not a bug)."""
    if isinstance(exc, OSError) and exc.errno in (28, 122):
        return True
    return isinstance(exc, (ReplyError, ProtocolError))
