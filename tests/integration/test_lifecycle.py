"""The real process's lifecycle: dropping privileges, graceful stop, systemd readiness."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import QUICKSTART_LDIF, embedded_directory
from tests.support.server import REPO, MailServer, free_port, twistd_env, wait_for

pytestmark = pytest.mark.slow

SERVICE_USER = ("nobody", "nogroup")


def _blocked_for(user: str, paths) -> str:
    """The first of ``paths`` (or an ancestor) that ``user`` cannot enter, or ""."""
    from mailserver.privileges import Identity, _reachable

    entry = pwd.getpwnam(user)
    who = Identity(entry.pw_uid, entry.pw_gid, user, tuple(os.getgrouplist(user, entry.pw_gid)))
    for p in paths:
        blocked = _reachable(os.path.join(os.path.realpath(p), "x"), who)
        if blocked:
            return blocked
    return ""


def _needs_root_and_a_reachable_python():
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    blocked = _blocked_for(SERVICE_USER[0], [os.path.realpath(sys.executable), sys.prefix, REPO,
                                             os.path.dirname(os.__file__)])
    if blocked:
        pytest.skip(f"{SERVICE_USER[0]} cannot reach the Python installation or the sources "
                    f"({blocked}); the server could not import after dropping privileges")


@pytest.fixture
def open_dir():
    """A directory the service user can traverse (pytest's own tmp is root-only)."""
    d = tempfile.mkdtemp(prefix="mailserver-lifecycle-", dir="/tmp")
    os.chmod(d, 0o711)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _children(pid: int) -> list:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _ldif_copy(where: Path) -> str:
    """The quick-start users in a file every user can read."""
    path = where / "users.ldif"
    shutil.copy(QUICKSTART_LDIF, path)
    os.chmod(path, 0o644)
    return str(path)


def _directory(where: Path) -> dict:
    return {**embedded_directory(), "ldif_file": _ldif_copy(where)}


TWISTD_OPTIONS = ("--uid", SERVICE_USER[0], "--gid", SERVICE_USER[1])
USER_KEYS = {"user": SERVICE_USER[0], "group": SERVICE_USER[1]}


@pytest.mark.parametrize("options, keys", [(TWISTD_OPTIONS, {}), ((), USER_KEYS),
                                           ((), {**USER_KEYS, "workers": 2})],
                         ids=["twistd-options", "server-user", "two-workers"])
def test_drops_privileges_from_a_fresh_install(open_dir, options, keys):
    """Started as root with --uid/--gid (or [server] user/group) on empty
    directories, the server hands them to the user, runs as it, and delivers
    mail into private files."""
    _needs_root_and_a_reachable_python()
    nobody = pwd.getpwnam(SERVICE_USER[0])
    work = open_dir / "srv"
    sock = work / "run" / "lmtp.sock"
    server = MailServer(
        work, directory=_directory(open_dir), lmtp_unix=False,
        server={"allow_root": False, **keys},
        tls={"certificate": str(work / "tls" / "cert.pem"),
             "private_key": str(work / "tls" / "key.pem"), "self_signed": True},
        extra_listeners=({"name": "lmtp-unix", "protocol": "lmtp", "address": f"unix:{sock}"},),
        twistd_options=options).start()
    try:
        assert _uid_of(server.proc.pid) == nobody.pw_uid
        count = keys.get("workers", 1)  # the harness's default is one process
        serving = {int(p) for p in re.findall(r"\] worker (\d+) serving", server.log())}
        assert len(serving) == (count if count > 1 else 0)
        # Forked by a zygote that then exits: the workers become our children.
        deadline = time.monotonic() + 10
        while set(_children(server.proc.pid)) != serving and time.monotonic() < deadline:
            time.sleep(0.05)
        assert set(_children(server.proc.pid)) == serving
        for child in serving:
            assert _uid_of(child) == nobody.pw_uid
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
            s.sendmail("x@example.org", ["alice@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
        [msg] = server.messages("alice")
        st = msg.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, 0o600)
        assert stat.S_IMODE(os.stat(server.maildir("alice")).st_mode) == 0o700
        for d in (server.spool, server.spool / "incoming", server.queue_dir,
                  server.queue_dir / "active", server.maildir_root, sock.parent):
            st = os.stat(d)
            assert st.st_uid == nobody.pw_uid, d
            assert stat.S_IMODE(st.st_mode) & 0o007 == 0, d  # nothing for others
        for f in (work / "tls" / "key.pem", sock):
            assert os.stat(f).st_uid == nobody.pw_uid, f
        assert stat.S_IMODE(os.stat(work / "tls" / "key.pem").st_mode) == 0o600
        lmtp = smtplib.LMTP(str(sock))
        lmtp.ehlo("client.example")  # LHLO through the socket it was given
        lmtp.quit()
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def _run(server: MailServer) -> subprocess.CompletedProcess:
    return subprocess.run(server.command(), cwd=server.workdir, env=twistd_env(),
                          capture_output=True, text=True, timeout=60)


def _one_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0 and len(lines) == 1, out.stderr + out.stdout
    assert "Traceback" not in out.stderr + out.stdout
    return lines[0]


def _port_free(port: int) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_root_without_dropping_is_refused(tmp_path):
    """As root with no user to switch to and no allow_root, one line and exit before binding."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    server = MailServer(tmp_path / "srv", directory=embedded_directory(),
                        server={"allow_root": False})
    line = _one_line(_run(server))
    assert line.startswith(f"mailserver: {server.config_path}: server.user: refusing to run "
                           "as root"), line
    assert "allow_root = true" in line
    _port_free(server.smtp_port)


def test_directory_the_user_cannot_write_is_refused(open_dir):
    """An existing spool owned by root and closed to the user stops the start
    with one line naming the path and the chown that fixes it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    work = open_dir / "srv"
    work.mkdir()
    spool = work / "spool"
    spool.mkdir(mode=0o700)
    server = MailServer(work, directory=_directory(open_dir), lmtp_unix=False,
                        twistd_options=TWISTD_OPTIONS)
    line = _one_line(_run(server))
    assert line == (f"mailserver: {server.config_path}: server.spool_dir: {spool}: not "
                    f"writable by user {SERVICE_USER[0]}; run: chown -R "
                    f"{SERVICE_USER[0]}:{SERVICE_USER[1]} {spool}"), line
    _port_free(server.smtp_port)


def _readline(f) -> str:
    return f.readline().decode().rstrip("\r\n")


def test_sigterm_lets_the_message_in_flight_finish(tmp_path):
    """SIGTERM in the middle of DATA: new connections are refused, the message
    completes with 250 and is delivered, 421 4.3.2 follows, and exit is 0."""
    server = MailServer(tmp_path / "srv", directory=embedded_directory()).start()
    try:
        conn = socket.create_connection(("127.0.0.1", server.smtp_port), timeout=30)
        f = conn.makefile("rb")
        assert _readline(f).startswith("220")
        conn.sendall(b"HELO client.example\r\nMAIL FROM:<x@example.org>\r\n"
                     b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        replies = [_readline(f) for _ in range(4)]
        assert replies[-1].startswith("354"), replies
        conn.sendall(b"Subject: in flight\r\n\r\nfirst half\r\n")
        os.kill(server.proc.pid, signal.SIGTERM)
        wait_for(lambda: "mailserver stopping" in server.log(), "the stop to begin")

        def refused():
            try:
                socket.create_connection(("127.0.0.1", server.smtp_port), timeout=5).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_for(refused, "the listener to close", deadline=5)
        assert server.proc.poll() is None  # still waiting for our message
        conn.sendall(b"second half\r\n.\r\n")
        assert _readline(f).startswith("250 2.0.0")
        assert len(server.messages("alice")) == 1
        try:
            conn.sendall(b"NOOP\r\n")
        except OSError:
            pass  # the 421 may have closed the connection already
        assert _readline(f).startswith("421 4.3.2")
        assert f.read() == b""  # and the connection is closed
        conn.close()
        assert server.proc.wait(30) == 0
        assert os.listdir(server.spool / "incoming") == []
    finally:
        server.stop()


def test_readiness_is_notified_once_the_ports_accept(tmp_path):
    """With NOTIFY_SOCKET set, READY=1 arrives only when every listener accepts;
    SIGHUP sends RELOADING=1 then READY=1, and SIGTERM STOPPING=1."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(path)
        notify.settimeout(30)
        server = MailServer(tmp_path / "srv", directory=embedded_directory(),
                            extra_listeners=({"name": "pop3", "protocol": "pop3",
                                              "address": f"127.0.0.1:{free_port()}",
                                              "plaintext_auth": True},),
                            env={"NOTIFY_SOCKET": path})
        server.launch()  # no waiting: the datagram must say when to connect
        try:
            message = notify.recv(4096).decode()
            assert message.split("\n")[0] == "READY=1", message
            for port in (server.smtp_port, server.lmtp_port, *server.extra_ports):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            assert os.path.exists(server.lmtp_socket)
            os.kill(server.proc.pid, signal.SIGHUP)
            assert notify.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert notify.recv(4096) == b"READY=1"
            server.proc.send_signal(signal.SIGTERM)
            assert notify.recv(4096) == b"STOPPING=1"
            assert server.proc.wait(30) == 0
        finally:
            server.stop()


def test_sigterm_ends_an_idle_pop3_session_without_update(tmp_path):
    """SIGTERM while a POP3 session idles after DELE: the client gets
    -ERR [SYS/TEMP], nothing is deleted (no UPDATE), and the exit is 0."""
    port = free_port()
    server = MailServer(tmp_path / "srv", directory=embedded_directory(),
                        extra_listeners=({"name": "pop3", "protocol": "pop3",
                                          "address": f"127.0.0.1:{port}",
                                          "plaintext_auth": True},)).start()
    try:
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as s:
            s.sendmail("x@example.org", ["alice@example.test"], b"Subject: keep me\r\n\r\nhi\r\n")
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        f = conn.makefile("rb")
        assert _readline(f).startswith("+OK")
        conn.sendall(b"USER alice\r\nPASS alice-password\r\nDELE 1\r\n")
        replies = [_readline(f) for _ in range(3)]
        assert all(r.startswith("+OK") for r in replies), replies
        os.kill(server.proc.pid, signal.SIGTERM)
        assert _readline(f).startswith("-ERR [SYS/TEMP]")
        assert f.read() == b""
        conn.close()
        assert server.proc.wait(30) == 0
        assert len(server.messages("alice")) == 1
    finally:
        server.stop()
