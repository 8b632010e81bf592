# -*- test-case-name: tests.unit.test_pop3 -*-
"""The TRANSACTION-state commands of the sans-IO POP3 core (STAT, LIST, UIDL,
RETR, TOP, DELE, RSET, NOOP), answered from the login snapshot, and the
argument helpers every command uses.  A mixin of
:class:`mailserver.sansio.pop3.POP3ServerConnection`; the rules are in that
module's docstring, under *Transaction*."""

from __future__ import annotations

import re
from typing import Callable, Optional

from mailserver.sansio.pop3_events import MessageInfo, Retrieve

DIGITS = re.compile("[0-9]{1,10}")


class Refusal(Exception):
    """A command is refused: the ``-ERR`` text and optional response code."""

    def __init__(self, text: str, code: Optional[str] = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code


def split_words(arg: str) -> list[str]:
    """Arguments separated by one or more spaces."""
    return [w for w in arg.split(" ") if w]


def no_args(arg: str) -> None:
    if arg.strip(" "):
        raise Refusal("no arguments expected")


class TransactionCommands:
    """STAT, LIST, UIDL, RETR, TOP, DELE, RSET and NOOP.  The core provides
    ``messages``, ``deleted``, ``_ok``, ``_out``, ``_decide`` and ``_junk``."""

    def _totals(self) -> tuple[int, int]:
        """Count and octets of the messages not marked deleted."""
        live = [m.size for i, m in enumerate(self.messages) if i not in self.deleted]
        return len(live), sum(live)

    def _message(self, word: str) -> int:
        """The 0-based index of an existing, undeleted message number."""
        number = int(word) if DIGITS.fullmatch(word) else 0
        if not 1 <= number <= len(self.messages):
            raise Refusal("no such message")
        if number - 1 in self.deleted:
            raise Refusal(f"message {number} already deleted")
        return number - 1

    def _listing(self, arg: str, heading: str, field: Callable[[MessageInfo], str]) -> None:
        """LIST or UIDL: one message, or every undeleted one."""
        words = split_words(arg)
        if len(words) > 1:
            raise Refusal("syntax error")
        if words:
            index = self._message(words[0])
            self._ok(f"{index + 1} {field(self.messages[index])}")
            return
        # Each line is "<number> <size or UIDL>": never a leading dot, never
        # CR or LF (MessageInfo checks the UIDL), so no per-line checks.
        deleted = self.deleted
        self._ok(heading)
        self._out += "".join(
            [f"{i} {field(m)}\r\n" for i, m in enumerate(self.messages, 1) if i - 1 not in deleted]
        ).encode("ascii")
        self._out += b".\r\n"

    def _do_stat(self, arg: str) -> None:
        no_args(arg)
        self._ok("%d %d" % self._totals())

    def _do_list(self, arg: str) -> None:
        self._listing(arg, "%d messages (%d octets)" % self._totals(), lambda m: str(m.size))

    def _do_uidl(self, arg: str) -> None:
        self._listing(arg, "unique-id listing follows", lambda m: m.uid)

    def _do_retr(self, arg: str) -> None:
        words = split_words(arg)
        if len(words) != 1:
            raise Refusal("syntax error: RETR msg")
        index = self._message(words[0])
        self._decide(Retrieve(index + 1, index, self.messages[index], None))

    def _do_top(self, arg: str) -> None:
        words = split_words(arg)
        if len(words) != 2:
            raise Refusal("syntax error: TOP msg n")
        index = self._message(words[0])
        if not DIGITS.fullmatch(words[1]):
            raise Refusal("invalid line count")
        self._decide(Retrieve(index + 1, index, self.messages[index], int(words[1])))

    def _do_dele(self, arg: str) -> None:
        words = split_words(arg)
        if len(words) != 1:
            raise Refusal("syntax error: DELE msg")
        index = self._message(words[0])
        self.deleted.add(index)
        self._ok(f"message {index + 1} deleted")

    def _do_rset(self, arg: str) -> None:
        no_args(arg)
        if self._junk():
            return
        self.deleted.clear()
        self._ok("maildrop has %d messages (%d octets)" % self._totals())

    def _do_noop(self, arg: str) -> None:
        no_args(arg)
        if not self._junk():
            self._ok()
