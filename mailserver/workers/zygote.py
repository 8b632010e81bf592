# -*- test-case-name: tests.unit.test_zygote -*-
"""The process the workers are forked from: ``python -m
mailserver.workers.zygote`` (started by the supervisor, never by hand).

A Python process that has imported Twisted, pyOpenSSL and this package
holds about 30 MiB of objects of its own before it serves anyone, and every
worker started with ``python -m mailserver.workers.worker`` paid that again.
The zygote imports all of it once (every module of the package, and so
every library a worker may use), with the collector stopped, puts the
objects out of the collector's reach (``gc.freeze``) and then forks each
worker on request: the children share those pages with it (copy-on-write)
instead of holding copies.  The supervisor lets it go once every worker it
asked for is forked (kept alive, it would end up holding a private copy of
every page a worker writes), and starts a new one to replace a worker that
died.  It is the shape of Python's ``multiprocessing`` forkserver and of
gunicorn's ``preload_app``, without either's machinery.

The zygote never installs a reactor: a forked child must start with one of
its own (an epoll set shared between processes would deliver one worker's
events to the other).  It runs no threads and logs nothing itself; a
child's Twisted, logging and reactor start after the fork, in
:func:`mailserver.workers.worker.main`.

The supervisor talks to it over one UNIX stream socket (``--control FD``),
in lines:

* ``fork SLOT`` with one descriptor attached (``SCM_RIGHTS``): the child's
  end of that worker's AMP channel.  The zygote forks, and the child runs the
  worker with it; the reply is ``forked SLOT PID`` (or ``failed SLOT
  REASON`` when ``fork`` itself failed);
* ``ended PID CODE SIGNAL`` comes unasked whenever a child is reaped (the
  workers are the zygote's children, not the supervisor's).

Its other arguments (``--config``, ``--log``, ``--listen``) are passed
to every worker as they are; the descriptors ``--listen`` names (the
listening sockets) are the zygote's own from its start, and every child
inherits them.  When the control socket closes (the supervisor let it go,
or is gone) the zygote exits; its children serve on, and notice the
supervisor's end by their own channels.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import select
import signal
import socket
import sys
import traceback
from typing import List, Tuple

#: Twisted's modules for the reactor a worker installs (importing them
#: installs nothing; ``twisted.internet.reactor`` would, and is never here).
REACTOR_MODULES = (
    "twisted.internet.epollreactor",
    "twisted.internet.posixbase",
    "twisted.internet.unix",
    "twisted.internet.udp",
    "twisted.python.sendmsg",
)


#: Largest control message read at once, and descriptors per read.
_READ = 4096
_MAX_FDS = 16


def preload() -> int:
    """Import every module of this package (so also every library a worker
    may import later: dnspython, dkimpy, ldap3...) and the reactor's; the
    number of modules loaded.  One that fails to import is left for the
    worker to report."""
    import pkgutil

    import mailserver

    names = list(REACTOR_MODULES)
    names += [m.name for m in pkgutil.walk_packages(mailserver.__path__, "mailserver.",
                                                    onerror=lambda name: None)]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass
    if "twisted.internet.reactor" in sys.modules:  # pragma: no cover - a bug of ours
        raise RuntimeError("the zygote must not install a reactor")
    return len(sys.modules)


PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value) -> None:
    """Linux ``prctl(option, value)``; nothing elsewhere or when it fails
    (what it sets is a convenience, never needed to serve)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(option, value, 0, 0, 0)
    except Exception:
        pass


def _name(name: str) -> None:
    """The process's short name, as ``ps -o comm`` and ``top`` show it
    (the command line stays the zygote's)."""
    prctl(PR_SET_NAME, name.encode()[:15])


def exit_code_and_signal(status: int) -> Tuple[int, int]:
    """``(exit code, 0)`` or ``(-1, signal)`` of a ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        return -1, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), 0


def parse(buffer: bytes, fds: List[int]) -> Tuple[list, bytes, List[int]]:
    """Split the complete lines out of ``buffer``: ``(requests, rest,
    unused fds)``, each request ``("fork", slot, fd)``; a ``fork`` without a
    descriptor, or a line that is not understood, is ``("bad", text, -1)``."""
    requests = []
    *lines, rest = buffer.split(b"\n")
    for line in lines:
        words = line.split()
        if len(words) == 2 and words[0] == b"fork" and words[1].isdigit() and fds:
            requests.append(("fork", int(words[1]), fds.pop(0)))
        else:
            requests.append(("bad", line.decode("ascii", "replace"), -1))
    return requests, rest, fds


class Zygote:
    """The request loop (blocking: there is no reactor here)."""

    def __init__(self, control: socket.socket, worker_args: List[str],
                 worker_module: str = "mailserver.workers.worker") -> None:
        self.control = control
        self.worker_args = worker_args
        self.worker_module = worker_module
        self.buffer = b""
        self.fds: List[int] = []
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.batch: List[int] = []  # channel ends of the requests being handled

    def run(self) -> int:
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select via the fd below
        signal.set_wakeup_fd(self.wake_w)
        while True:
            try:
                ready, _, _ = select.select([self.control, self.wake_r], [], [])
            except InterruptedError:  # pragma: no cover - select retries by itself
                continue
            if self.wake_r in ready:
                self._drain_wakeups()
                self._reap()
            if self.control in ready and not self._read():
                return 0

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _read(self) -> bool:
        """Handle what the supervisor sent; False once it has gone."""
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, _READ, _MAX_FDS)
        except InterruptedError:  # pragma: no cover
            return True
        except OSError:
            return False
        if not data:
            return False
        requests, self.buffer, self.fds = parse(self.buffer + data, self.fds + list(fds))
        self.batch = [fd for kind, _slot, fd in requests if kind == "fork"]
        for kind, slot, fd in requests:
            if kind == "fork":
                self._fork(slot, fd)
                self.batch.remove(fd)  # closed here now: later children lack it
            else:
                self._say(f"failed - not understood: {slot}")
        return True

    def _fork(self, slot: int, channel_fd: int) -> None:
        try:
            pid = os.fork()
        except OSError as e:
            os.close(channel_fd)
            self._say(f"failed {slot} {e.strerror or e}")
            return
        if pid == 0:
            self._child(channel_fd)  # never returns
        os.close(channel_fd)
        self._say(f"forked {slot} {pid}")

    def _child(self, channel_fd: int) -> None:
        code = 70
        try:
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_DFL)
            self.control.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            # Other workers' channel ends (of this batch, or come early):
            # a copy here would keep a channel open after its worker died.
            for fd in self.fds + self.batch:
                if fd != channel_fd:
                    os.close(fd)
            _name("mailserver-wrk")
            gc.enable()  # the frozen objects stay out of its reach
            worker = importlib.import_module(self.worker_module)
            code = worker.main(["--channel", str(channel_fd), *self.worker_args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code, sig = exit_code_and_signal(status)
            self._say(f"ended {pid} {code} {sig}")

    def _say(self, line: str) -> None:
        try:
            self.control.sendall(line.encode("ascii") + b"\n")
        except OSError:
            pass  # the supervisor is gone; the next read sees it


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mailserver-zygote")
    parser.add_argument("--control", type=int, required=True)
    parser.add_argument("--worker-module", default="mailserver.workers.worker",
                        help=argparse.SUPPRESS)  # the tests' stand-in worker
    # Everything else (--config, --listen, --log) is the workers'.
    args, worker_args = parser.parse_known_args(argv)
    # Ctrl-C at a terminal reaches the whole process group; the supervisor
    # decides. SIGTERM and SIGHUP go to the workers, never here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # logrotate's kill -USR1 to all
    _name("mailserver-zyg")
    gc.disable()
    preload()
    gc.freeze()
    control = socket.socket(fileno=args.control)
    control.setblocking(True)
    return Zygote(control, worker_args, args.worker_module).run()


if __name__ == "__main__":
    sys.exit(main())
