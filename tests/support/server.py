"""Run the real server: write a config, start ``twistd -n mailserver``, wait, stop.

Used by the integration tests.  The server runs from the source tree
(``PYTHONPATH`` is the repository root) so the tests exercise the plugin file
in ``twisted/plugins/`` exactly as twistd discovers it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
TWISTD = str(Path(sys.executable).with_name("twistd"))


_HANDED_OUT: set = set()


def free_port() -> int:
    """A loopback port nothing listens on now, never one this process handed
    out before (the kernel may offer the same free port twice in a row)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def maildir_messages(path) -> list:
    """The messages of the maildir at ``path``; none while it (or its new/ or
    cur/, which the server creates one after the other) does not exist yet."""
    import mailbox

    path = Path(path)
    if not ((path / "new").is_dir() and (path / "cur").is_dir()):
        return []
    try:
        return list(mailbox.Maildir(str(path), factory=None, create=False))
    except FileNotFoundError:  # a message moved to cur/ while we listed
        return []


def wait_for(predicate, what: str, deadline: float = 30.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something true, and return that.

    For progress made by another process (the server's queue run), which no
    in-process clock can drive; fails after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_port(port: int, deadline: float, proc: Optional[subprocess.Popen] = None) -> None:
    """Poll until something accepts on 127.0.0.1:port (the server is up)."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_value(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def render_toml(tables: dict, listeners: list) -> str:
    out = []
    for name, table in tables.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
        out.append("")
    for lst in listeners:
        out.append("[[listeners]]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in lst.items())
        out.append("")
    return "\n".join(out)


def twistd_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class MailServer:
    """One real ``twistd -n mailserver`` process with its own config and files."""

    def __init__(self, workdir: Path, *, directory: dict, tls: Optional[dict] = None,
                 smtp: Optional[dict] = None, server: Optional[dict] = None,
                 relay: Optional[dict] = None, queue: Optional[dict] = None,
                 domains: tuple = ("example.test",), lmtp_unix: bool = True,
                 smtp_port: Optional[int] = None, extra_tables: Optional[dict] = None,
                 extra_listeners: tuple = (), twistd_options: tuple = (),
                 env: Optional[dict] = None) -> None:
        self.workdir = Path(workdir)
        self.twistd_options = tuple(twistd_options)  # before the plugin name: --uid...
        self.env = dict(env or {})  # added to the server's environment
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.smtp_port = smtp_port or free_port()
        self.lmtp_port = free_port()
        self.lmtp_socket = str(self.workdir / "lmtp.sock")
        self.maildir_root = self.workdir / "mail"
        self.spool = self.workdir / "spool"
        self.log_path = self.workdir / "server.log"
        self.queue_dir = self.workdir / "queue"
        tables = {
            # The tests run as root in CI: say that this is meant.
            # One process unless a test asks for workers (tests/integration/test_workers.py).
            "server": {"hostname": "mx.example.test", "spool_dir": str(self.spool), "workers": 1,
                       **({"allow_root": True} if os.geteuid() == 0 else {}), **(server or {})},
            "domains": {"local": list(domains)},
            "directory": directory,
            "store": {"maildir_root": str(self.maildir_root)},
            "queue": {"directory": str(self.queue_dir), **(queue or {})},
            # Tests relay only when they say so, and never ask real DNS.
            "relay": {"trusted_networks": [], "nameservers": ["127.0.0.1:9"], **(relay or {})},
            # No SPF/DKIM/DMARC unless a test asks (127.0.0.1:9 would time out).
            "checks": {"enabled": False},
        }
        if tls:
            tables["tls"] = tls
        if smtp:
            tables["smtp"] = smtp
        # More tables ([auth], [submission]...) and listeners, as given; the
        # extra listeners on "127.0.0.1:port" are waited for by start().
        tables.update(extra_tables or {})
        listeners = [
            {"name": "smtp", "protocol": "smtp", "address": f"127.0.0.1:{self.smtp_port}"},
            {"name": "lmtp", "protocol": "lmtp", "address": f"127.0.0.1:{self.lmtp_port}"},
        ]
        if lmtp_unix:
            listeners.append({"name": "lmtp-unix", "protocol": "lmtp",
                              "address": f"unix:{self.lmtp_socket}"})
        listeners.extend(extra_listeners)
        self.extra_ports = [int(lst["address"].rpartition(":")[2]) for lst in extra_listeners
                            if lst.get("address", "").startswith("127.0.0.1:")]
        self.config_path = self.workdir / "mailserver.toml"
        self.config_path.write_text(render_toml(tables, listeners))
        self.proc: Optional[subprocess.Popen] = None

    def command(self) -> list:
        return [TWISTD, "-n", "--pidfile=", *self.twistd_options, "mailserver",
                "--config", str(self.config_path)]

    def launch(self) -> subprocess.Popen:
        """Start the process without waiting for anything."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=self.workdir,
                                     env={**twistd_env(), **self.env},
                                     stdout=self._log, stderr=subprocess.STDOUT)
        return self.proc

    def start(self, timeout: float = 30.0) -> "MailServer":
        # The log file is appended to: a restart waits for a start line of its own.
        starts = self.log().count("mailserver started")
        self.launch()
        deadline = time.monotonic() + timeout
        try:
            wait_for_port(self.smtp_port, deadline, self.proc)
            wait_for_port(self.lmtp_port, deadline, self.proc)
            for port in self.extra_ports:
                wait_for_port(port, deadline, self.proc)
            # Ports open before startService has run (signal handlers included).
            while self.log().count("mailserver started") <= starts:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("no start line")
                time.sleep(0.02)
        except Exception:
            self.stop()
            raise RuntimeError("server did not start:\n" + self.log())
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        self._log.close()
        return code

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def maildir(self, local: str, domain: str = "example.test") -> Path:
        return self.maildir_root / domain / local

    def messages(self, local: str, domain: str = "example.test") -> list:
        new = self.maildir(local, domain) / "new"
        if not new.is_dir():
            return []
        return sorted(new.iterdir())
