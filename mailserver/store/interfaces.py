# -*- test-case-name: tests.unit.test_maildir -*-
"""What the rest of the server asks the mail store.

A store puts one message into one local mailbox, durably.  The calls here
block (they write and fsync files), so the Twisted side runs them in a worker
thread; nothing in this module touches the reactor.

Two ways in, one transaction underneath:

* :meth:`IMailStore.deliver` copies a finished message from a file (the
  spooled DATA) into a mailbox and returns once it is on stable storage;
* :meth:`IMailStore.begin` opens the same transaction for callers that stream
  the content themselves, as an :class:`IDelivery` with ``write``,
  ``commit`` and ``abort`` (STYLE.md §11.7).

The POP3 side (a snapshot view of one mailbox, with deletions applied at
UPDATE) will get its own interface in this module; it reads the same maildirs
that :meth:`IMailStore.maildir_for` names.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IDelivery(Interface):
    """One message on its way into one mailbox.

    Content passed to :meth:`write` uses CRLF line endings, as received over
    SMTP after dot-unstuffing; the store converts it to its own on-disk
    convention.  Nothing is visible to mailbox readers until :meth:`commit`
    returns.
    """

    path = Attribute("Where the message is being written until commit.")

    def write(data: bytes) -> None:
        """Append ``data`` to the message.

        Raises ``OSError`` (``ENOSPC``, ``EDQUOT``, ...) when the disk refuses;
        the caller then calls :meth:`abort`.
        """

    def commit() -> str:
        """Make the message durable and visible; return its final path.

        When this returns, the message survives a crash.  On failure the
        partial message is removed and the error re-raised.
        """

    def abort() -> None:
        """Throw the message away.  Safe to call more than once, and after a
        failed :meth:`commit`."""


class IMailStore(Interface):
    """Durable local delivery into per-user mailboxes."""

    def maildir_for(mailbox) -> str:
        """The absolute path of ``mailbox``'s maildir.

        ``mailbox`` is a :class:`mailserver.directory.interfaces.Mailbox`.
        The path is derived from the mailbox address with unsafe characters
        encoded, and is always inside the store's root: anything that would
        resolve outside it raises a ``PermFailure`` (which is also a
        ``ValueError``).  The maildir need not exist yet.
        """

    def begin(mailbox, *, sender: str, prefix: bytes = b"", folder: str = ""):
        """Start delivering one message to ``mailbox``; return an
        :class:`IDelivery`.

        ``sender`` is the envelope sender without angle brackets (``""`` for
        the null sender).  The stored message starts with ``Return-Path`` and
        ``Delivered-To`` headers, then ``prefix`` (complete CRLF-terminated
        header lines such as ``Received:``), then whatever is written, with
        the ``Return-Path:`` fields of its header section left out; a
        ``Delivered-To:`` there naming ``mailbox`` is a loop (554 5.4.6).
        With ``folder``, the message goes to the Maildir++ folder
        ``.<folder>`` of the maildir (created when missing), not the inbox.
        """

    def deliver(mailbox, *, sender: str, source_path: str, prefix: bytes = b"",
                folder: str = "") -> str:
        """Deliver the message in the file ``source_path`` to ``mailbox``.

        Same headers as :meth:`begin`; the file holds the content with CRLF
        line endings and is read in bounded chunks.  Returns the final path
        once the message is on stable storage.  Raises ``OSError`` with the
        original ``errno`` when the disk fails (``ENOSPC``/``EDQUOT`` mean a
        temporary failure to the client), leaving no trace of the message.
        """

    def deliver_bytes(mailbox, *, sender: str, data: bytes, prefix: bytes = b"") -> str:
        """Like :meth:`deliver`, with the content in memory (a listener's
        small message, a generated report)."""


class IMaildrop(Interface):
    """One POP3 session's snapshot of one mailbox (RFC 1939).

    Taken at login under an exclusive lock; mail delivered later is not part
    of it.  Messages are addressed by their 0-based position in
    :attr:`messages`.  Every call blocks on file I/O (worker thread) except
    :meth:`read_small` and :meth:`needs_io`.
    """

    messages = Attribute(
        "The snapshot, oldest delivery first: a list of values with name, "
        "subdir, uid (the UIDL) and size (octets with CRLF line ends)."
    )
    uidlist_problem = Attribute(
        "Why a Dovecot UID list was ignored (for the log), or None."
    )

    def open_message(index: int):
        """The message's content as a binary file, read-only.

        Raises ``FileNotFoundError`` when the message was expunged by
        someone else meanwhile.
        """

    def read_small(index: int, limit: int):
        """The message's whole content as bytes when its file is where it
        was last seen and holds at most ``limit`` octets, else None.  One
        bounded read, no listing: callable from the event loop."""

    def needs_io(deleted, retrieved) -> bool:
        """Whether :meth:`update` with these arguments would change
        anything on disk (without a system call)."""

    def update(deleted, retrieved) -> None:
        """The UPDATE state: remove ``deleted``, mark the rest as seen by a
        client and ``retrieved`` as read.  Raises ``OSError`` (after doing
        what it could) when some change failed."""

    def close() -> None:
        """Release the lock.  Safe to call more than once."""
