"""Private instances of the reference servers for ``compare.py``: Postfix as
the final destination of the test domain (virtual(8) maildir delivery) and
Dovecot with LMTP, POP3 and an auth socket that Postfix's submission service
uses for SASL.  Each lives in its own directory, listens on loopback ports
picked free, and is stopped (every process of it) by ``stop()``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from benchmarks.pop3_throughput import Dovecot, _user_or, dovecot_version
from tests.support.server import free_port

POSTFIX_INSTALL = "apt-get install postfix"
DOVECOT_INSTALL = "apt-get install dovecot-core dovecot-lmtpd dovecot-pop3d"
LIBEXEC_DOVECOT = (Path("/usr/lib/dovecot"), Path("/usr/libexec/dovecot"))


def ensure_packages(install: bool) -> None:
    """Postfix (with smtp-source) and Dovecot's LMTP and POP3 servers, installed
    with apt-get when missing and ``install`` is true, else a clear exit."""
    missing = []
    if not shutil.which("postfix") and not os.access("/usr/sbin/postfix", os.X_OK):
        missing.append("postfix")
    if not any((d / "lmtp").exists() for d in LIBEXEC_DOVECOT):
        missing.append("dovecot-lmtpd")
    if not any((d / "pop3").exists() for d in LIBEXEC_DOVECOT):
        missing.append("dovecot-pop3d")
    if not missing:
        return
    if not install:
        raise SystemExit("compare: missing " + ", ".join(missing) + "; install with:\n    "
                         "apt-get install " + " ".join(["dovecot-core", *missing]))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Postfix asks for its configuration type and mail name; "No configuration"
    # leaves the system instance unconfigured (we never start it).
    selections = ("postfix postfix/main_mailer_type select No configuration\n"
                  "postfix postfix/mailname string localhost\n")
    subprocess.run(["debconf-set-selections"], input=selections.encode(), check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "dovecot-core", *missing], check=True, env=env)


def find_binary(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        raise SystemExit(f"compare: {name} not found ({POSTFIX_INSTALL})")
    return path


def wait_greeting(port: int, prefix: bytes, deadline: float, proc=None) -> bytes:
    """Poll until 127.0.0.1:port greets with ``prefix``; returns the greeting."""
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                greeting = s.recv(512)
                if greeting.startswith(prefix):
                    s.sendall(b"QUIT\r\n")
                    return greeting
                last = greeting
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not greet with {prefix!r}: {last!r}")


MASTER_CF = """\
# service type private unpriv chroot wakeup maxproc command
127.0.0.1:{smtp_port} inet n - n - - smtpd
127.0.0.1:{submission_port} inet n - n - - smtpd
  -o syslog_name=postfix/submission
  -o smtpd_tls_security_level=encrypt
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_tls_auth_only=yes
  -o smtpd_client_restrictions=permit_sasl_authenticated,reject
  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
tlsmgr unix - - n 1000? 1 tlsmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
virtual unix - n n - - virtual
lmtp unix - - n - - lmtp
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-bench.example.net
mydomain = example.net
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
alias_maps =
alias_database =
local_recipient_maps =
biff = no
maillog_file = {base}/postfix.log
maillog_file_prefixes = {base}
smtpd_banner = $myhostname ESMTP
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {base}/mail
virtual_mailbox_maps = texthash:{base}/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 1
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_security_level = may
smtpd_sasl_type = dovecot
smtpd_sasl_path = {sasl_path}
smtpd_sasl_auth_enable = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
"""


class Postfix:
    """``postfix -c <dir> start``: the final destination for ``domain``,
    delivering through virtual(8) into ``<base>/mail/<domain>/<user>/``
    (maildirs, owned by ``nobody``), SMTP and submission (STARTTLS required,
    AUTH through Dovecot's socket at ``sasl_path``) on free loopback ports."""

    def __init__(self, base: Path, domain: str, users: list, cert: str, key: str,
                 sasl_path: str) -> None:
        self.base = base
        self.binary = find_binary("postfix")
        self.smtp_port = free_port()
        self.submission_port = free_port()
        nobody = pwd.getpwnam("nobody")
        postfix = pwd.getpwnam("postfix")
        self.mail = base / "mail"
        for d in (base / "etc", base / "queue", base / "data", self.mail / domain):
            d.mkdir(parents=True, exist_ok=True)
        os.chown(base / "data", postfix.pw_uid, postfix.pw_gid)
        for d in (self.mail, self.mail / domain):
            os.chown(d, nobody.pw_uid, nobody.pw_gid)
        (base / "vmailbox").write_text(
            "".join(f"{u}@{domain} {domain}/{u}/\n" for u in users))
        (base / "etc" / "main.cf").write_text(MAIN_CF.format(
            base=base, domain=domain, uid=nobody.pw_uid, gid=nobody.pw_gid, cert=cert, key=key,
            sasl_path=sasl_path))
        (base / "etc" / "master.cf").write_text(MASTER_CF.format(
            smtp_port=self.smtp_port, submission_port=self.submission_port))
        self.domain = domain
        self.version = subprocess.run(
            [find_binary("postconf"), "-d", "-h", "mail_version"], capture_output=True,
            text=True, timeout=30).stdout.strip()
        self.pid: Optional[int] = None

    def maildir(self, user: str) -> Path:
        return self.mail / self.domain / user

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([self.binary, "-c", str(self.base / "etc"), *args],
                              capture_output=True, text=True, timeout=60, check=check)

    def start(self, timeout: float = 60.0) -> "Postfix":
        try:
            self._postfix("start")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"postfix start failed: {e.stdout}{e.stderr}\n{self.log()}\n"
                               "(it says why only on a terminal: "
                               f"postfix -c {self.base / 'etc'} check)") from e
        deadline = time.monotonic() + timeout
        pidfile = self.base / "queue" / "pid" / "master.pid"
        while self.pid is None and time.monotonic() < deadline:
            try:
                self.pid = int(pidfile.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.05)
        wait_greeting(self.smtp_port, b"220 postfix-bench", deadline)
        return self

    def stop(self) -> None:
        if self.pid is None:
            return
        self._postfix("abort", check=False)  # master and children exit at once
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(self.pid):
            time.sleep(0.05)
        if _alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        self.pid = None

    def log(self) -> str:
        try:
            return (self.base / "postfix.log").read_text(errors="replace")
        except OSError:
            return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive; postfix's master is not our child, so it never is one
    return True


DOVECOT_CONF = """\
protocols = pop3 lmtp
listen = 127.0.0.1
ssl = no
base_dir = {base}/run
state_dir = {base}/state
log_path = {log}
default_internal_user = {internal}
default_login_user = {login}
first_valid_uid = 1
disable_plaintext_auth = no
auth_mechanisms = plain
auth_username_format = %Ln
mail_location = maildir:{base}/mail/%n
passdb {{
  driver = passwd-file
  args = {base}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={base}/home/%n allow_all_users=yes
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
  unix_listener lmtp {{
    mode = 0
  }}
}}
service auth {{
  unix_listener {sasl_socket} {{
    mode = 0666
  }}
}}
"""


class DovecotReference(Dovecot):
    """Dovecot with POP3 and LMTP on free loopback ports, maildirs at
    ``<base>/mail/<user>`` (owned by ``nobody``), a passwd-file of ``users``
    (all with ``password``), and the auth service's client socket at
    ``sasl_socket`` for Postfix.  Starting, stopping and the log are
    ``pop3_throughput.Dovecot``'s; only the configuration differs."""

    def __init__(self, binary: str, base: Path, users: list, password: str,
                 sasl_socket: str) -> None:  # not Dovecot.__init__: a config of its own
        self.binary = binary
        self.base = base
        self.port = free_port()  # POP3: what Dovecot.start() waits for
        self.lmtp_port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.version, self.version_text = dovecot_version(binary)
        if self.version >= (2, 4):
            raise SystemExit("compare: Dovecot 2.4's configuration is not written yet "
                             f"(found {self.version_text})")
        nobody = pwd.getpwnam("nobody")
        self.uid, self.gid = nobody.pw_uid, nobody.pw_gid
        for d in (base / "run", base / "state", base / "home", base / "mail"):
            d.mkdir(parents=True, exist_ok=True)
        for d in (base / "home", base / "mail"):
            os.chown(d, self.uid, self.gid)
        passwd = base / "passwd"
        passwd.write_text("".join(f"{u}:{{PLAIN}}{password}\n" for u in users))
        os.chmod(passwd, 0o644)
        self.log_path = base / "dovecot.log"
        self.config = base / "dovecot.conf"
        self.config.write_text(DOVECOT_CONF.format(
            base=base, log=self.log_path, internal=_user_or("dovecot", "nobody"),
            login=_user_or("dovenull", "nobody"), uid=self.uid, gid=self.gid,
            pop3_port=self.port, lmtp_port=self.lmtp_port, sasl_socket=sasl_socket))

    def maildir(self, user: str) -> Path:
        return self.base / "mail" / user
