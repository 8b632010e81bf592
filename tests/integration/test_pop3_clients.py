"""Real mail clients against the POP3 listeners: fetchmail and getmail6.

The server is the one ``test_pop3`` starts (POP3 with STLS, POP3S, and POP3
with STLS and USER/PASS allowed before TLS; one mailbox per test).  Both
clients check the server's certificate against the test CA.  fetchmail and
getmail6 are Debian packages, installed by scripts/test.sh.  getmail6 has no
STLS for POP3, so it is run over POP3S and over the plaintext-auth listener.
"""

from __future__ import annotations

import getpass
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import List

import pytest

from tests.integration.test_pop3 import (
    HOST,
    SERVER_NAME,
    deliver,
    names,
    password,
    start_pop3_server,
    unique,
)

pytestmark = pytest.mark.slow


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = (f"{tool} is not installed: install the Debian package {package!r} "
                   "(scripts/test.sh does)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def cn_tls_files(tmp_path_factory):
    """A CA and a certificate for mx.example.test that also names it in the subject's CN:
    fetchmail refuses a certificate without a CN ("Server name not specified in certificate!"),
    whatever its subjectAltName says."""
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("tls-cn")
    ca = trustme.CA()
    cert = ca.issue_cert(SERVER_NAME, HOST, common_name=SERVER_NAME)
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return {"certificate": str(d / "server.pem"), "private_key": str(d / "server.pem"),
            "ca": str(d / "ca.pem")}


@pytest.fixture(scope="module")
def pop(tmp_path_factory, cn_tls_files):
    srv = start_pop3_server(tmp_path_factory.mktemp("pop3-clients"), cn_tls_files)
    yield srv
    srv.server.stop()


def stored(srv, uid: str) -> List[str]:
    """Every message file name in uid's maildir on the server, new/ and cur/."""
    return names(srv, uid, "new") + names(srv, uid, "cur")


def same_messages(received: List[bytes], originals: List[bytes]) -> bool:
    """The fetched messages are the delivered files, byte for byte, in any order."""
    return sorted(received) == sorted(originals)


def without_fetchmail_trace(data: bytes) -> bytes:
    """A message as fetchmail delivered it, without the Received field it adds (below any
    Return-Path and Delivered-To, which it keeps on top)."""
    header, sep, body = data.partition(b"\n\n")
    fields: List[List[bytes]] = []
    for line in header.split(b"\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    kept = [f for f in fields
            if not (f[0].startswith(b"Received: ") and b"(fetchmail-" in b"\n".join(f))]
    assert len(kept) == len(fields) - 1, data
    return b"\n".join(line for f in kept for line in f) + sep + body


# --- fetchmail --------------------------------------------------------------------------------

class Fetchmail:
    """fetchmail runs for one mailbox, with its own rc file, UID file and pid file, delivering
    each message to a file of its own in ``out`` through a tiny MDA."""

    def __init__(self, home: Path, srv, uid: str, port: int, *options: str) -> None:
        self.binary = require("fetchmail", "fetchmail")
        self.home = home
        self.out = home / "out"
        self.out.mkdir(parents=True)
        mda = home / "deliver.sh"
        mda.write_text('#!/bin/sh\nf=$(mktemp "$1/msg.XXXXXX") && exec cat > "$f"\n')
        mda.chmod(0o755)
        self.rc = home / "fetchmailrc"
        self.rc.write_text(
            "set no bouncemail\n"
            f"poll {HOST} service {port} protocol POP3 uidl\n"
            f'  user "{uid}" there with password "{password(uid)}"\n'
            # fetchmail matches DNS names only, not the certificate's IP address.
            f'  sslcertck sslcertfile "{srv.ca}" sslcommonname {SERVER_NAME}\n'
            f'  {" ".join(options)}\n'
            f'  mda "{mda} {self.out}"\n')
        self.rc.chmod(0o600)  # fetchmail refuses an rc file others can read

    def run(self) -> subprocess.CompletedProcess:
        env = dict(os.environ, HOME=str(self.home), FETCHMAILHOME=str(self.home),
                   FETCHMAILUSER=getpass.getuser())
        return subprocess.run(
            [self.binary, "-f", str(self.rc), "--nodetach", "--nosyslog", "-v",
             "--pidfile", str(self.home / "fetchmail.pid"), "--idfile",
             str(self.home / "fetchids")],
            capture_output=True, text=True, timeout=60, env=env)

    def remembered(self) -> set:
        """The UIDLs fetchmail's id file keeps (lines "<user>@<host> <uidl>")."""
        lines = (self.home / "fetchids").read_text().splitlines()
        return {line.split()[1] for line in lines if line.strip()}

    def messages(self) -> List[bytes]:
        return [without_fetchmail_trace(p.read_bytes()) for p in sorted(self.out.iterdir())]


@pytest.fixture
def fetchmail_home(tmp_path):
    home = tmp_path / "fetchmail"
    home.mkdir(mode=0o700)
    return home


def test_fetchmail_stls_deletes_fetched_mail(pop, fetchmail_home):
    """fetchmail with STLS (sslproto TLS1.2+, certificate checked) fetches both messages and
    deletes them from the server; a second run finds nothing."""
    paths = [deliver(pop, "fetch-stls", f"fetchmail-stls-{i}") for i in range(2)]
    originals = [p.read_bytes() for p in paths]
    fm = Fetchmail(fetchmail_home, pop, "fetch-stls", pop.stls_port, "sslproto 'TLS1.2+'")
    done = fm.run()
    assert done.returncode == 0, done.stdout + done.stderr
    transcript = done.stdout + done.stderr
    assert "POP3> STLS" in transcript and "POP3< +OK Begin TLS negotiation" in transcript
    assert "POP3< +OK Bye" in transcript
    assert same_messages(fm.messages(), originals)
    assert stored(pop, "fetch-stls") == []
    again = fm.run()
    assert again.returncode == 1, again.stdout + again.stderr  # 1: no mail
    assert len(fm.messages()) == 2


def test_fetchmail_keep_with_uidl_fetches_only_new_mail(pop, fetchmail_home):
    """fetchmail with keep and uidl leaves the messages on the server (read with TOP, so in
    cur/ without the S flag), remembers their UIDLs, and a second run fetches only the message
    delivered since."""
    paths = [deliver(pop, "fetch-keep", f"fetchmail-keep-{i}") for i in range(2)]
    originals = [p.read_bytes() for p in paths]
    fm = Fetchmail(fetchmail_home, pop, "fetch-keep", pop.stls_port, "sslproto 'TLS1.2+'",
                   "keep")
    done = fm.run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert same_messages(fm.messages(), originals)
    assert names(pop, "fetch-keep", "new") == []
    assert "POP3> TOP 1 99999999" in done.stdout  # keep: TOP, which does not mark seen
    assert names(pop, "fetch-keep", "cur") == sorted(p.name + ":2," for p in paths)
    assert fm.remembered() == {unique(p.name) for p in paths}
    third = deliver(pop, "fetch-keep", "fetchmail-keep-new")
    originals.append(third.read_bytes())
    done = fm.run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert same_messages(fm.messages(), originals)
    assert len(stored(pop, "fetch-keep")) == 3
    assert fm.remembered() == {unique(p.name) for p in [*paths, third]}
    assert fm.run().returncode == 1  # nothing new
    assert len(fm.messages()) == 3


def test_fetchmail_pop3s(pop, fetchmail_home):
    """fetchmail with ssl on the POP3S port fetches the message and deletes it from the server."""
    path = deliver(pop, "fetch-pop3s", "fetchmail-pop3s")
    original = path.read_bytes()
    fm = Fetchmail(fetchmail_home, pop, "fetch-pop3s", pop.pop3s_port, "ssl")
    done = fm.run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "STLS" not in done.stdout + done.stderr
    assert same_messages(fm.messages(), [original])
    assert stored(pop, "fetch-pop3s") == []


# --- getmail6 ---------------------------------------------------------------------------------

def dest_user() -> List[str]:
    """getmail refuses to write a Maildir as root: as root, it writes as nobody."""
    return ["user = nobody"] if os.geteuid() == 0 else []


@pytest.fixture
def maildir(tmp_path):
    """getmail's destination maildir (new/, cur/, tmp/); as root one that nobody owns, outside
    pytest's private temporary directory."""
    if os.geteuid() != 0:
        path = tmp_path / "Maildir"
        path.mkdir()
        owner = None
    else:
        try:
            owner = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and there is no user nobody to deliver as")
        path = Path(tempfile.mkdtemp(prefix="getmail-dest-"))
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir()
    if owner is not None:
        for p in (path, path / "new", path / "cur", path / "tmp"):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    yield path
    if owner is not None:
        shutil.rmtree(path)


class Getmail:
    """getmail runs for one mailbox, with its own rc file and getmail directory (where it keeps
    the UIDLs seen), delivering to the maildir ``dest``."""

    def __init__(self, home: Path, dest: Path, srv, uid: str, *, ssl: bool,
                 delete: bool) -> None:
        self.binary = require("getmail", "getmail6")
        self.home = home
        self.dest = dest
        retriever = [
            "type = SimplePOP3SSLRetriever" if ssl else "type = SimplePOP3Retriever",
            f"server = {HOST}", f"port = {srv.pop3s_port if ssl else srv.plain_port}",
            f"username = {uid}", f"password = {password(uid)}", "timeout = 30",
        ]
        if ssl:
            retriever += [f"ca_certs = {srv.ca}", f"ssl_cert_hostname = {SERVER_NAME}"]
        self.rc = home / "getmailrc"
        self.rc.write_text("\n".join([
            "[retriever]", *retriever, "",
            "[destination]", "type = Maildir", f"path = {self.dest}/", *dest_user(), "",
            "[options]", f"delete = {str(delete).lower()}", "read_all = false",
            "delivered_to = false", "received = false", "verbose = 2", ""]))
        self.rc.chmod(0o600)

    def run(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.binary, f"--rcfile={self.rc}", f"--getmaildir={self.home}"],
            capture_output=True, text=True, timeout=60, env=dict(os.environ, HOME=str(self.home)))

    def messages(self) -> List[bytes]:
        return [p.read_bytes() for p in sorted((self.dest / "new").iterdir())]


def test_getmail_pop3s_keeps_mail_and_fetches_only_new(pop, tmp_path, maildir):
    """getmail over POP3S with delete = false leaves the messages on the server (seen, in cur/)
    and a second run fetches only the message delivered since."""
    paths = [deliver(pop, "getmail-keep", f"getmail-keep-{i}") for i in range(2)]
    originals = [p.read_bytes() for p in paths]
    gm = Getmail(tmp_path, maildir, pop, "getmail-keep", ssl=True, delete=False)
    done = gm.run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 messages (" in done.stdout and "retrieved" in done.stdout, done.stdout
    assert same_messages(gm.messages(), originals)
    assert names(pop, "getmail-keep", "new") == []
    assert names(pop, "getmail-keep", "cur") == sorted(p.name + ":2,S" for p in paths)
    third = deliver(pop, "getmail-keep", "getmail-keep-new")
    originals.append(third.read_bytes())
    done = gm.run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert same_messages(gm.messages(), originals)
    assert len(stored(pop, "getmail-keep")) == 3


def test_getmail_pop3s_deletes_fetched_mail(pop, tmp_path, maildir):
    """getmail over POP3S with delete = true fetches every message and removes it from the
    server."""
    paths = [deliver(pop, "getmail-delete", f"getmail-delete-{i}") for i in range(2)]
    originals = [p.read_bytes() for p in paths]
    gm = Getmail(tmp_path, maildir, pop, "getmail-delete", ssl=True, delete=True)
    done = gm.run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert same_messages(gm.messages(), originals)
    assert stored(pop, "getmail-delete") == []


def test_getmail_plain_pop3_on_the_plaintext_auth_listener(pop, tmp_path, maildir):
    """getmail without TLS (it has no STLS for POP3) logs in on the plaintext_auth listener and
    fetches and deletes the message."""
    path = deliver(pop, "getmail-plain", "getmail-plain")
    original = path.read_bytes()
    gm = Getmail(tmp_path, maildir, pop, "getmail-plain", ssl=False, delete=True)
    done = gm.run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert same_messages(gm.messages(), [original])
    assert stored(pop, "getmail-plain") == []
