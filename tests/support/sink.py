"""Postfix's ``smtp-sink`` as a real remote SMTP server for tests and benchmarks.

smtp-sink (Debian package ``postfix``, /usr/sbin/smtp-sink) accepts SMTP and
throws the mail away, or with ``-d TEMPLATE`` writes each transaction to a
file of its own: its own header lines (``X-Client-Addr``, ``X-Helo-Args``,
``X-Mail-Args``, one ``X-Rcpt-Args`` per RCPT, a three-line ``Received``),
then the message as received with CRLF turned into LF and dot-stuffing
undone.  From the source (postfix 3.7): the file is created at MAIL, closed at
the end of DATA *before* the reply to the final dot is sent, and unlinked when
the transaction is aborted (RSET, a new EHLO, a lost connection).  So with
soft or hard failures limited to commands before the final dot, every dump is
a message the sink answered 250 for (or was about to), and a client killed in
mid-transaction leaves nothing behind.

Failures: ``-r CMD,...`` answers those commands with a soft (4xx) reply,
``-f CMD,...`` with a hard (5xx) one (either turns PIPELINING off); ``-b`` and
``-B`` set the reply text (default "450 4.3.0 Error: command failed" and
"500 5.3.0 Error: command failed").  ``-w N`` waits N seconds before the
reply to DATA.  ``-u USER`` is required when running as root.

:class:`SmtpSink` runs one on 127.0.0.1::

    sink = SmtpSink(soft_fail=("RCPT",), dump_dir=tmp / "sink").start()
    ...  # deliver to 127.0.0.1:sink.port
    sink.stop()
    SmtpSink(port=sink.port, dump_dir=tmp / "sink").start()   # same port, no failure

Without smtp-sink on the machine :func:`require_smtp_sink` skips the test, or
fails it when ``CI`` is set (scripts/test.sh installs ``postfix``).
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from tests.support.server import free_port, wait_for_port

__all__ = ["SMTP_SINK", "SinkMessage", "SmtpSink", "require_smtp_sink", "smtp_sink_path"]

SMTP_SINK = "/usr/sbin/smtp-sink"
_DUMP_PREFIX = "msg."


def smtp_sink_path() -> Optional[str]:
    """The smtp-sink binary, or None when it is not installed."""
    found = shutil.which("smtp-sink")
    if found:
        return found
    return SMTP_SINK if os.access(SMTP_SINK, os.X_OK) else None


def require_smtp_sink() -> str:
    """The smtp-sink binary; skip the calling test without it (fail under CI)."""
    import pytest

    path = smtp_sink_path()
    if path is None:
        message = ("smtp-sink not found: install the Debian package 'postfix' "
                   "(scripts/test.sh does)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class SinkMessage:
    """One transaction smtp-sink saved with ``-d``."""

    path: Path
    mtime: float
    helo: str = ""
    mail_args: str = ""
    rcpt_args: List[str] = field(default_factory=list)
    data: bool = False  # DATA was accepted (smtp-sink wrote its Received header)
    content: bytes = b""  # the message as received (LF line ends)

    @property
    def sender(self) -> str:
        """The MAIL FROM address without the angle brackets."""
        return self.mail_args.split(" ", 1)[0].strip("<>")

    @property
    def recipients(self) -> List[str]:
        return [a.split(" ", 1)[0].strip("<>") for a in self.rcpt_args]

    def message(self) -> email.message.EmailMessage:
        return email.message_from_bytes(self.content, policy=email.policy.default)

    def header(self, name: str) -> Optional[str]:
        value = self.message()[name]
        return None if value is None else str(value)


def parse_dump(path: Path) -> SinkMessage:
    """Split one dump file into smtp-sink's own fields and the message."""
    data = path.read_bytes()
    msg = SinkMessage(path=path, mtime=path.stat().st_mtime)
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        line = data[pos:end].decode("utf-8", "replace")
        pos = end + 1
        name, _, value = line.partition(": ")
        if name == "X-Helo-Args":
            msg.helo = value
        elif name == "X-Mail-Args":
            msg.mail_args = value
        elif name == "X-Rcpt-Args":
            msg.rcpt_args.append(value)
        elif name == "Received":
            msg.data = True
            # Its two continuation lines (by ... id ...; and the date) end
            # smtp-sink's part; the message follows.
            for _ in range(2):
                end = data.find(b"\n", pos)
                pos = len(data) if end < 0 else end + 1
            break
    content = data[pos:]
    # smtp-sink ends each dump with the empty line that preceded the dot.
    msg.content = content[:-1] if content.endswith(b"\n\n") else content
    return msg


class SmtpSink:
    """One ``smtp-sink`` process on 127.0.0.1:port.

    ``soft_fail``/``hard_fail``: SMTP commands (``"RCPT"``, ``"DATA"``,
    ``"MAIL"``, ``"."``...) answered with ``soft_reply`` (4xx) or
    ``hard_reply`` (5xx).  ``dump_dir``: save each message there (see
    :meth:`messages`); a restarted sink may share the directory.
    ``data_delay``: whole seconds before the reply to DATA.  ``options``: any
    other smtp-sink options, passed as they are.
    """

    def __init__(self, port: Optional[int] = None, soft_fail: Iterable[str] = (),
                 hard_fail: Iterable[str] = (), dump_dir=None, *, hostname: str = "sink.test",
                 soft_reply: Optional[str] = None, hard_reply: Optional[str] = None,
                 data_delay: int = 0, options: Iterable[str] = (), backlog: int = 256) -> None:
        self.port = port or free_port()
        self.soft_fail = tuple(soft_fail)
        self.hard_fail = tuple(hard_fail)
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.hostname = hostname
        self.soft_reply = soft_reply
        self.hard_reply = hard_reply
        self.data_delay = int(data_delay)
        self.options = tuple(options)
        self.backlog = backlog
        self.proc: Optional[subprocess.Popen] = None
        self.log_path: Optional[Path] = None

    def command(self, binary: str) -> List[str]:
        cmd = [binary]
        if os.geteuid() == 0:
            cmd += ["-u", "root"]  # smtp-sink refuses to run as root without -u
        cmd += ["-h", self.hostname]
        if self.dump_dir is not None:
            # strftime(3) expands the template: a literal % must be doubled.
            cmd += ["-d", str(self.dump_dir / _DUMP_PREFIX).replace("%", "%%")]
        if self.soft_fail:
            cmd += ["-r", ",".join(self.soft_fail)]
        if self.hard_fail:
            cmd += ["-f", ",".join(self.hard_fail)]
        if self.soft_reply:
            cmd += ["-b", self.soft_reply]
        if self.hard_reply:
            cmd += ["-B", self.hard_reply]
        if self.data_delay > 0:
            cmd += ["-w", str(self.data_delay)]
        cmd += list(self.options)
        cmd += [f"127.0.0.1:{self.port}", str(self.backlog)]
        return cmd

    def start(self, timeout: float = 10.0) -> "SmtpSink":
        """Start it and return once it accepts connections on ``port``."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("smtp-sink already running")
        binary = require_smtp_sink()
        log = None
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = self.dump_dir.with_name(self.dump_dir.name + ".log")
            log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command(binary), stdin=subprocess.DEVNULL,
                                         stdout=log or subprocess.DEVNULL,
                                         stderr=log or subprocess.DEVNULL)
        finally:
            if log is not None:
                log.close()  # the child has its own descriptor
        try:
            wait_for_port(self.port, time.monotonic() + timeout, self.proc)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"smtp-sink did not start on port {self.port}: {e}\n"
                               + self.log()) from None
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM, then SIGKILL); nothing listens on ``port`` afterwards."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def dump_files(self) -> List[Path]:
        if self.dump_dir is None:
            raise RuntimeError("no dump_dir: smtp-sink saves nothing")
        if not self.dump_dir.is_dir():
            return []
        return sorted(p for p in self.dump_dir.iterdir() if p.name.startswith(_DUMP_PREFIX))

    def count(self) -> int:
        """How many messages were saved (cheap: no file is read)."""
        return len(self.dump_files())

    def messages(self) -> List[SinkMessage]:
        """Every dump, oldest first: messages, and transactions still open or
        left open (``data`` False, no content)."""
        out = []
        for path in self.dump_files():
            try:
                out.append(parse_dump(path))
            except FileNotFoundError:  # an aborted transaction, unlinked meanwhile
                continue
        return sorted(out, key=lambda m: m.mtime)

    def by_message_id(self) -> Dict[str, List[SinkMessage]]:
        """Messages (dumps that got as far as DATA) grouped by their Message-ID
        header (duplicates stay)."""
        out: Dict[str, List[SinkMessage]] = {}
        for m in self.messages():
            if not m.data:
                continue
            out.setdefault(m.header("Message-ID") or "", []).append(m)
        return out

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
