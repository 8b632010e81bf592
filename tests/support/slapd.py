"""A real OpenLDAP slapd for tests, and pytest fixtures around it.

:class:`Slapd` builds a throw-away server in a temporary directory: a
``slapd.conf`` that includes the stock core, cosine, inetorgperson, nis and
misc schemas, one mdb database for ``dc=example,dc=test`` with a root DN,
and data loaded offline with ``slapadd`` before the first start.  It listens
on a free 127.0.0.1 port; :meth:`Slapd.stop` and :meth:`Slapd.start` stop and
restart it on the same port with the same data, for outage tests.

Fixtures (import them into a conftest or a test module)::

    from tests.support.slapd import slapd_server, slapd_factory  # noqa: F401

``slapd_server`` (session) is a running server with the quick-start users;
``slapd_factory`` (function) builds private servers and cleans them up.

Options beyond the defaults: ``suffix`` (another naming context),
``schemas`` (extra ``.schema`` files, such as the Active-Directory-shaped
``tests/data/ad.schema``), ``memberof`` (load OpenLDAP's memberof overlay
for groups of that object class, so members get ``memberOf`` values),
``tls`` (certificate and key: StartTLS on the plain port, plus an ldaps://
port) with ``tls_client_ca`` (demand a client certificate signed by it),
``security`` (a slapd ``security`` directive, e.g. ``tls=1``) and ``indexes``.  Overlays only act on changes made through the protocol,
never on ``slapadd``; with ``memberof`` (or ``online=True``) the LDIF is
therefore added over LDAP, as the root DN, right after the first start,
in file order.

:class:`FaultyProxy` sits between a client and a server and counts the
connections it is asked for; it can hang (accept, read, never answer, as a
stopped server does) or drop every connection (as a restarted server does),
so tests can count connection attempts instead of timing them.

When slapd is missing the fixtures skip, except under CI (``CI`` set in the
environment), where they fail: CI must never silently skip the LDAP tests.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple

from ldap3 import NONE, Connection, Server

import pytest

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_LDIF = ROOT / "etc" / "quickstart-users.ldif"

SUFFIX = "dc=example,dc=test"
ROOT_DN = "cn=admin,dc=example,dc=test"
ROOT_PASSWORD = "admin-password"
SCHEMAS = ("core", "cosine", "inetorgperson", "nis", "misc")
DEFAULT_INDEXES = ("objectClass", "uid", "mail", "mailLocalAddress")
DATA = ROOT / "tests" / "data"

_SCHEMA_DIRS = ("/etc/ldap/schema", "/etc/openldap/schema", "/usr/local/etc/openldap/schema")
_MODULE_DIRS = ("/usr/lib/ldap", "/usr/lib64/openldap", "/usr/lib/openldap",
                "/usr/libexec/openldap", "/usr/local/libexec/openldap")
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/local/libexec")


class SlapdUnavailable(RuntimeError):
    """slapd (or slapadd, or the stock schemas) is not installed here."""


def _find_program(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found:
        return found
    for folder in _SBIN:
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_installation() -> Tuple[str, str, str, Optional[str]]:
    """(slapd, slapadd, schema dir, module dir or None); raises SlapdUnavailable."""
    slapd, slapadd = _find_program("slapd"), _find_program("slapadd")
    if not slapd or not slapadd:
        raise SlapdUnavailable("slapd/slapadd not found (Debian: apt-get install slapd ldap-utils)")
    schema_dir = next((d for d in _SCHEMA_DIRS
                       if all(os.path.exists(f"{d}/{s}.schema") for s in SCHEMAS)), None)
    if schema_dir is None:
        raise SlapdUnavailable(f"no directory holds the {', '.join(SCHEMAS)} schemas")
    module_dir = next((d for d in _MODULE_DIRS if os.path.exists(f"{d}/back_mdb.so")), None)
    return slapd, slapadd, schema_dir, module_dir


def require_slapd() -> Tuple[str, str, str, Optional[str]]:
    """find_installation(), or skip the test; under CI, fail it instead."""
    try:
        return find_installation()
    except SlapdUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs OpenLDAP for the ldap tests: {e}", pytrace=False)
        pytest.skip(str(e))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slapd:
    """One slapd process with its own configuration, data and port.

    ``ldif`` lists files loaded with slapadd before the first start (default:
    the quick-start directory).  ``start()`` is idempotent; ``cleanup()``
    stops the server and deletes its directory.
    """

    def __init__(self, ldif: Sequence[os.PathLike] = (QUICKSTART_LDIF,), *,
                 port: Optional[int] = None, tls: Optional[Tuple[str, str]] = None,
                 tls_client_ca: Optional[str] = None, start_timeout: float = 15.0,
                 suffix: str = SUFFIX, schemas: Sequence[os.PathLike] = (),
                 memberof: Optional[str] = None, online: Optional[bool] = None,
                 indexes: Sequence[str] = DEFAULT_INDEXES, security: str = "") -> None:
        self.slapd, self.slapadd, self.schema_dir, self.module_dir = find_installation()
        self.ldif = [Path(p) for p in ldif]
        self.port = port or free_port()
        #: (certificate, key) PEM files: StartTLS on ``port``, and ldaps://
        #: on ``tls_port``.
        self.tls = tls
        self.tls_client_ca = tls_client_ca
        #: A ``security`` directive: ``tls=1`` refuses everything outside
        #: TLS, ``simple_bind=1`` only simple binds.
        self.security = security
        self.tls_port = free_port() if tls else None
        self.start_timeout = start_timeout
        self.suffix = suffix
        self.root_dn = ROOT_DN if suffix == SUFFIX else f"cn=admin,{suffix}"
        self.root_password = ROOT_PASSWORD
        self.schemas = [Path(p) for p in schemas]
        self.memberof = memberof
        self.online = bool(memberof) if online is None else online
        self.indexes = tuple(indexes)
        self.path = Path(tempfile.mkdtemp(prefix="slapd-"))
        self.config = self.path / "slapd.conf"
        self.log_path = self.path / "slapd.log"
        self.process: Optional[subprocess.Popen] = None
        self._loaded = False
        self._write_config()
        if not self.online:
            self._load()

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def listeners(self) -> str:
        urls = [f"{self.uri}/"] + ([f"{self.ldaps_uri}/"] if self.tls else [])
        return " ".join(urls)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _write_config(self) -> None:
        data = self.path / "data"
        data.mkdir()
        lines = [f"include {self.schema_dir}/{name}.schema" for name in SCHEMAS]
        lines += [f"include {path.resolve()}" for path in self.schemas]
        if self.module_dir:
            lines += [f"modulepath {self.module_dir}", "moduleload back_mdb"]
            if self.memberof:
                lines.append("moduleload memberof")
        if self.tls:
            lines += [f"TLSCertificateFile {self.tls[0]}", f"TLSCertificateKeyFile {self.tls[1]}"]
            if self.tls_client_ca:
                lines += [f"TLSCACertificateFile {self.tls_client_ca}", "TLSVerifyClient demand"]
        if self.security:
            lines.append(f"security {self.security}")
        lines += [
            f"pidfile {self.path}/slapd.pid",
            f"argsfile {self.path}/slapd.args",
            "database mdb",
            "maxsize 67108864",
            f'suffix "{self.suffix}"',
            f'rootdn "{self.root_dn}"',
            f"rootpw {self.root_password}",
            f"directory {data}",
        ]
        if self.indexes:
            lines.append(f"index {','.join(self.indexes)} eq")
        if self.memberof:
            lines += ["overlay memberof", f"memberof-group-oc {self.memberof}",
                      "memberof-member-ad member", "memberof-memberof-ad memberOf"]
        lines += [
            # Passwords may be used to bind, never read back.
            "access to attrs=userPassword by self write by anonymous auth by * none",
            "access to * by * read",
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def _run(self, *args: str) -> None:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")

    def _load(self) -> None:
        for path in self.ldif:
            self._run(self.slapadd, "-q", "-f", str(self.config), "-l", str(path))
        self._loaded = True

    def _load_online(self) -> None:
        """Add the LDIF entries over LDAP, so overlays see every change."""
        from mailserver.directory.ldif import read_ldif

        conn = Connection(Server(self.uri, get_info=NONE), self.root_dn, self.root_password,
                          raise_exceptions=True, auto_bind=True)
        try:
            for path in self.ldif:
                for dn, attributes in read_ldif(str(path)):
                    conn.add(dn, attributes=attributes)
        finally:
            conn.unbind()
        self._loaded = True

    def start(self) -> None:
        """Start slapd (same port, same data) and wait until it answers."""
        if self.running:
            return
        deadline = time.monotonic() + self.start_timeout
        while True:
            log = open(self.log_path, "ab")
            try:
                # -d keeps slapd in the foreground, so we own the process.
                self.process = subprocess.Popen(
                    [self.slapd, "-f", str(self.config), "-h", self.listeners, "-d", "0"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                )
            finally:
                log.close()
            if self._wait_ready(deadline):
                if not self._loaded:
                    self._load_online()
                return
            # Exited early: most likely the port is still held; try again.
            if time.monotonic() > deadline:
                raise RuntimeError(f"slapd did not start on {self.uri}:\n{self.read_log()[-3000:]}")
            time.sleep(0.1)

    def _wait_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                for port in filter(None, (self.port, self.tls_port)):
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"slapd did not listen on {self.uri} in time:\n"
                           f"{self.read_log()[-3000:]}")

    def stop(self) -> None:
        """Stop slapd cleanly (SIGTERM), killing it if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.path, ignore_errors=True)

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "Slapd":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


# Running servers shared across the session, keyed by their LDIF files.  The
# fixtures below may be imported into several modules, and pytest then makes
# one session fixture per module; this cache keeps it to one slapd per data set.
_shared: Dict[Tuple[str, ...], Slapd] = {}


def _shared_key(ldif: Iterable[os.PathLike], options: dict) -> Tuple[str, ...]:
    return (*(str(Path(p).resolve()) for p in ldif), repr(sorted(options.items())))


def shared_slapd(ldif: Iterable[os.PathLike] = (QUICKSTART_LDIF,), **options) -> Slapd:
    """A running server for ``ldif`` (and :class:`Slapd` ``options``),
    started once per test session.

    Callers must not stop it for good; an outage test uses its own server.
    """
    require_slapd()
    ldif = list(ldif)
    key = _shared_key(ldif, options)
    server = _shared.get(key)
    if server is None:
        server = _shared[key] = Slapd(ldif, **options)
    server.start()
    return server


def release_shared(ldif: Iterable[os.PathLike] = (QUICKSTART_LDIF,), **options) -> None:
    """Stop and delete the shared server for ``ldif``, if there is one."""
    server = _shared.pop(_shared_key(list(ldif), options), None)
    if server is not None:
        server.cleanup()


class FaultyProxy:
    """A TCP proxy to ``127.0.0.1:port`` that counts connections and can
    misbehave on demand.

    ``connections`` is how many connections clients opened through it.
    After :meth:`hang`, bytes from either side are read and thrown away, so
    every request waits for its timeout; :meth:`resume` forwards again.
    :meth:`drop` closes every open connection, as a server restart does.
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.connections = 0
        self.hung = False
        self._open: list = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name="faulty-proxy").start()

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def hang(self) -> None:
        self.hung = True

    def resume(self) -> None:
        self.hung = False

    def drop(self) -> None:
        """Close every connection open now (both sides)."""
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            _close(sock)

    def close(self) -> None:
        _close(self._listener)
        self.drop()

    def __enter__(self) -> "FaultyProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._open += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self.hung:
                    dst.sendall(data)
        except OSError:
            pass
        _close(src)
        _close(dst)


def _close(sock: socket.socket) -> None:
    """Close ``sock`` so that a thread blocked reading it wakes up."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def _release_all() -> None:
    while _shared:
        _shared.popitem()[1].cleanup()


atexit.register(_release_all)  # a safety net: never leave a slapd behind


@pytest.fixture(scope="session")
def slapd_server():
    """A running slapd holding etc/quickstart-users.ldif (shared, session-wide)."""
    yield shared_slapd()
    release_shared()


@pytest.fixture
def slapd_factory():
    """``make(ldif=..., port=...)`` builds a private, started Slapd; all are
    cleaned up after the test."""
    require_slapd()
    made = []

    def make(ldif: Sequence[os.PathLike] = (QUICKSTART_LDIF,), **kwargs) -> Slapd:
        server = Slapd(ldif, **kwargs)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.cleanup()
