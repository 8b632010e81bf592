"""Run the example deployments of ``etc/examples/`` as they are, on a test box.

:func:`rewrite_example` parses an example file and changes only what ties it
to a real machine:

* every listener address becomes a free port on 127.0.0.1 (a UNIX socket
  moves into the work directory), remembered by listener name;
* every path in the file (spool, maildirs, queue, certificate...) moves into
  the work directory; the certificate is made self-signed on first start;
* the directory is pointed at a test server or file (``directory``: keys to
  replace, ``None`` to drop one, such as ``tls_ca_file``);
* domains are renamed (``domains``: ``{"example.org": "example.test"}``) to
  match the test directory's data;
* every next hop the server would send to (``[relay.internal]``,
  ``internal_host``, ``smarthost``) becomes ``next_hop``, an smtp-sink, and
  DNS questions go to a closed port, never to the real DNS;
* ``overrides`` (``{table: {key: value or None}}``) come last.

:class:`ExampleServer` starts ``twistd -n mailserver`` on the result and waits
until every listener accepts and the start line is logged.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

from mailserver.config import SECTIONS
from tests.support.server import (REPO, TWISTD, free_port, render_toml, twistd_env,
                                  wait_for, wait_for_port)

EXAMPLES = REPO / "etc" / "examples"


@dataclass
class Example:
    """A rewritten example: its config file and where its listeners are."""

    name: str
    workdir: Path
    config_path: Path
    tables: dict
    ports: Dict[str, int] = field(default_factory=dict)  # listener name -> TCP port
    sockets: Dict[str, str] = field(default_factory=dict)  # listener name -> UNIX path

    @property
    def maildir_root(self) -> Path:
        return Path(self.tables["store"]["maildir_root"])


def _rename(domain: str, domains: Dict[str, str]) -> str:
    return domains.get(domain.lower(), domain)


def service_user() -> Optional[Tuple[str, str]]:
    """("nobody", "nogroup") when this process is root and that user can run
    this Python and read these sources (so the examples can drop privileges
    as in production), else None: then they stay root with allow_root."""
    import os
    import pwd
    import sys

    from mailserver.privileges import Identity, _reachable

    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    who = Identity(entry.pw_uid, entry.pw_gid, "nobody",
                   tuple(os.getgrouplist("nobody", entry.pw_gid)))
    for path in (os.path.realpath(sys.executable), sys.prefix, str(EXAMPLES.parent.parent),
                 os.path.dirname(os.__file__)):
        if _reachable(os.path.join(os.path.realpath(path), "x"), who):
            return None
    return ("nobody", "nogroup")


def rewrite_example(name: str, workdir: Path, *, directory: Optional[dict] = None,
                    domains: Optional[Dict[str, str]] = None, next_hop: str = "",
                    overrides: Optional[dict] = None,
                    user: Optional[Tuple[str, str]] = None) -> Example:
    """Write ``workdir/<name>`` rewritten for this machine; see the module
    docstring."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    raw = tomllib.loads((EXAMPLES / name).read_text())
    listeners = raw.pop("listeners")
    tables = {k: dict(v) for k, v in raw.items()}
    files = workdir / "files"
    files.mkdir(exist_ok=True)
    for section, cls in SECTIONS.items():
        table = tables.get(section, {})
        for f in dataclasses.fields(cls):
            if f.metadata.get("path") and table.get(f.name):
                table[f.name] = str(files / f"{section}.{f.name}")
    if tables.get("tls", {}).get("certificate"):
        tables["tls"]["self_signed"] = True
    tables.setdefault("server", {})["base_dir"] = str(workdir)
    tables["server"].setdefault("workers", 1)  # one process, as the other tests run
    # There is no "mailserver" user here: drop to ``user`` as production
    # drops to its own, or (not root, or nobody cannot run this Python) stay.
    tables["server"].pop("user", None)
    tables["server"].pop("group", None)
    if user is not None:
        tables["server"]["user"], tables["server"]["group"] = user
        import grp
        import os
        import pwd

        # The administrator's part: the service's own directory (the UNIX
        # socket lives there) belongs to the service user.
        os.chown(workdir, pwd.getpwnam(user[0]).pw_uid, grp.getgrnam(user[1]).gr_gid)
    else:
        tables["server"]["allow_root"] = True
    for key, value in (directory or {}).items():
        if value is None:
            tables["directory"].pop(key, None)
        else:
            tables["directory"][key] = value
    domains = {k.lower(): v for k, v in (domains or {}).items()}
    d = tables.setdefault("domains", {})
    for kind in ("local", "relay"):
        if kind in d:
            d[kind] = [_rename(x, domains) for x in d[kind]]
    relay = tables.setdefault("relay", {})
    relay["nameservers"] = ["127.0.0.1:9"]  # a closed port: never the real DNS
    # SPF/DKIM/DMARC would wait for that closed port: off unless overridden.
    tables.setdefault("checks", {}).setdefault("enabled", False)
    if "internal" in relay:
        relay["internal"] = {_rename(k, domains): next_hop or v
                             for k, v in relay["internal"].items()}
    for key in ("internal_host", "smarthost"):
        if relay.get(key) and next_hop:
            relay[key] = next_hop
    for table, values in (overrides or {}).items():
        target = tables.setdefault(table, {})
        for key, value in values.items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    example = Example(name, workdir, workdir / name, tables)
    rewritten = []
    for lst in listeners:
        lst = dict(lst)
        label = lst.get("name") or f"{lst['protocol']}/{lst['address']}"
        if lst["address"].startswith("unix:"):
            path = str(workdir / f"{label}.sock")
            lst["address"] = f"unix:{path}"
            example.sockets[label] = path
        else:
            port = free_port()
            lst["address"] = f"127.0.0.1:{port}"
            example.ports[label] = port
        rewritten.append(lst)
    example.config_path.write_text(render_toml(tables, rewritten))
    return example


class ExampleServer:
    """``twistd -n mailserver`` on a rewritten example."""

    def __init__(self, example: Example) -> None:
        self.example = example
        self.log_path = example.workdir / "server.log"
        self.proc: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None  # once stopped

    def start(self, timeout: float = 30.0) -> "ExampleServer":
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "mailserver", "--config",
                 str(self.example.config_path)],
                cwd=self.example.workdir, env=twistd_env(), stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        try:
            for port in self.example.ports.values():
                wait_for_port(port, deadline, self.proc)
            while "mailserver started" not in self.log() or not all(
                    os.path.exists(p) for p in self.example.sockets.values()):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("no start line")
                time.sleep(0.02)
        except Exception:
            self.stop()
            raise RuntimeError(f"{self.example.name} did not start:\n{self.log()}") from None
        return self

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.returncode = proc.returncode
        return proc.returncode

    def reload(self) -> None:
        """SIGHUP, then wait until the server says it re-read its settings."""
        before = self.log().count("reloaded directory settings")
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: self.log().count("reloaded directory settings") > before,
                 f"{self.example.name} to reload")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "ExampleServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
