"""``mailserverctl lookup`` and ``auth-test`` against the embedded LDIF
directory and a real slapd.

The main answers come from real subprocesses (``python -m mailserver.ctl``);
the many small variations call ``mailserver.ctl.main`` in this process, which
runs the same code without paying for an interpreter start each time.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import pty
import select
import subprocess
import sys
import time

import pytest

from mailserver.ctl import describe_restriction, main, print_resolution
from mailserver.directory.interfaces import Mailbox, Resolution, SenderRestriction
from tests.support.server import REPO, render_toml, twistd_env
from tests.support.slapd import slapd_factory, slapd_server  # noqa: F401 (fixtures)

QUICKSTART_LDIF = str(REPO / "etc" / "quickstart-users.ldif")
ALICE_DN = "uid=alice,ou=people,dc=example,dc=test"
BOB_DN = "uid=bob,ou=people,dc=example,dc=test"


def write_config(tmp_path, directory: dict) -> str:
    path = tmp_path / "mailserver.toml"
    path.write_text(render_toml(
        {"domains": {"local": ["example.test"]}, "directory": directory},
        [{"protocol": "smtp", "address": "127.0.0.1:2525"}],
    ))
    return str(path)


def ldap_directory(uri: str) -> dict:
    return {"backend": "ldap", "uris": [uri], "base_dn": "dc=example,dc=test",
            "bind_dn": "cn=mailserver,dc=example,dc=test",
            "bind_password": "mailserver-password", "connect_timeout": 2.0,
            "operation_timeout": 2.0}


def ctl(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailserver.ctl", *args], input=stdin,
                          capture_output=True, text=True, env=twistd_env(), cwd=REPO,
                          timeout=60)


def ctl_all(runs):
    """``ctl(*args, stdin=...)`` for each (args, stdin) in ``runs``, two at a time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda run: ctl(*run[0], stdin=run[1]), runs))


def ctl_here(capsys, monkeypatch, *args: str, stdin: str = ""):
    """``mailserverctl ARGS`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


#: What each backend is asked in subprocesses, once per backend.
LOOKUPS = {
    "user": "Alice@Example.Test",
    "alias": "postmaster@example.test",
    "group": "team@example.test",
    "unknown": "nobody@example.test",
}
AUTHS = {
    "ok": ("alice", "alice-password"),
    "wrong": ("alice", "bob-password"),
}


def run_all(config: str) -> dict:
    runs = [(("lookup", address, "-c", config), "") for address in LOOKUPS.values()]
    runs += [(("auth-test", login, "--config", config), password + "\n")
             for login, password in AUTHS.values()]
    done = ctl_all(runs)
    keys = [("lookup", k) for k in LOOKUPS] + [("auth", k) for k in AUTHS]
    return dict(zip(keys, done))


@pytest.fixture(scope="module")
def embedded_results(tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("embedded"),
                          {"backend": "ldif", "ldif_file": QUICKSTART_LDIF})
    return run_all(config)


@pytest.fixture(scope="module")
def slapd_results(tmp_path_factory, slapd_server):  # noqa: F811
    return run_all(write_config(tmp_path_factory.mktemp("slapd"),
                                ldap_directory(slapd_server.uri)))


@pytest.fixture
def embedded_config(tmp_path):
    return write_config(tmp_path, {"backend": "ldif", "ldif_file": QUICKSTART_LDIF})


@pytest.fixture
def slapd_config(tmp_path, slapd_server):  # noqa: F811
    return write_config(tmp_path, ldap_directory(slapd_server.uri))


BACKENDS = ["embedded_results", pytest.param("slapd_results", marks=pytest.mark.ldap)]
CONFIGS = ["embedded_config", pytest.param("slapd_config", marks=pytest.mark.ldap)]


@pytest.fixture(params=BACKENDS)
def results(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(params=CONFIGS)
def config(request):
    return request.getfixturevalue(request.param)


def test_lookup_user(results):
    done = results["lookup", "user"]
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("alice@example.test: found\n")
    assert f"alice@example.test: matches {ALICE_DN}" in out
    assert f"  alice@example.test  login=alice  dn={ALICE_DN}\n" in out
    assert "mailboxes: 1\n" in out and "forwards: 0\n" in out
    assert out.endswith("domain example.test: local\n")


def test_lookup_alias_shows_each_step(results):
    done = results["lookup", "alias"]
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    steps = [line.strip() for line in lines[lines.index("trace:") + 1:lines.index("mailboxes: 1")]]
    assert steps == [
        "postmaster@example.test: matches cn=postmaster,ou=groups,dc=example,dc=test",
        "cn=postmaster,ou=groups,dc=example,dc=test: routes to alice@example.test",
        f"alice@example.test: matches {ALICE_DN}",
        f"{ALICE_DN}: mailbox alice@example.test (login alice)",
    ]


def test_lookup_group(results):
    done = results["lookup", "group"]
    assert done.returncode == 0, done.stderr
    assert "group with 2 member(s)" in done.stdout
    assert "mailboxes: 2\n" in done.stdout
    assert f"  bob@example.test  login=bob  dn={BOB_DN}\n" in done.stdout


def test_lookup_unknown_exits_1(results):
    done = results["lookup", "unknown"]
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("nobody@example.test: unknown")
    assert "nobody@example.test: no entry" in done.stdout


def test_lookup_names_a_foreign_domain(config, capsys, monkeypatch):
    code, out, _ = ctl_here(capsys, monkeypatch, "lookup", "bob@Elsewhere.Test", "-c", config)
    assert code == 1
    assert out.endswith("domain elsewhere.test: not local\n")


def test_disabled_and_restricted_resolutions_are_shown():
    restricted = Resolution(
        address="team@example.test", mailboxes=(Mailbox("bob@example.test", "bob", BOB_DN),),
        restriction=SenderRestriction(allowed_senders=frozenset({"boss@example.test"}),
                                      members_only=True,
                                      members=frozenset({"bob@example.test"}),
                                      authenticated_only=True),
        trace=("team@example.test: matches cn=team",))
    out = io.StringIO()
    print_resolution(restricted, out)
    assert ("senders allowed: listed senders: boss@example.test or its 1 member(s), "
            "authenticated only\n") in out.getvalue()
    out = io.StringIO()
    print_resolution(Resolution(address="carol@example.test", disabled=True), out)
    assert out.getvalue().startswith("carol@example.test: disabled")
    assert "  (nothing matched)\n" in out.getvalue()
    assert describe_restriction(SenderRestriction()) == \
        "nobody (the sender list resolved to nothing)"
    assert describe_restriction(SenderRestriction(any_sender=True)) == "anyone"


@pytest.mark.parametrize("address", ["*@example.test", "x)(uid=*@example.test",
                                     "*)(mail=*@example.test", "alice\\2a@example.test"])
def test_lookup_filter_injection_matches_nothing(config, capsys, monkeypatch, address):
    code, out, err = ctl_here(capsys, monkeypatch, "lookup", address, "-c", config)
    assert code == 1, (out, err)
    assert "mailboxes: 0" in out


def test_auth_test_from_stdin(results):
    done = results["auth", "ok"]
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"ok: alice authenticated as {ALICE_DN} "
                           f"(login alice, address alice@example.test)\n"
                           "may send as: abuse@example.test, alice.liddell@example.test, "
                           "alice@example.test, postmaster@example.test\n")


def test_auth_test_refusal(results):
    done = results["auth", "wrong"]
    assert (done.returncode, done.stdout) == (1, "failed: wrong login or password\n"), done.stderr


@pytest.mark.parametrize("login,password", [
    ("alice", "alice-password "),  # whitespace belongs to the password
    ("alice", "ALICE-PASSWORD"),
    ("nobody", "alice-password"),
    ("alice", ""),
    ("*", "alice-password"),
    ("alice)(uid=*", "alice-password"),
])
def test_auth_test_refusals_look_the_same(config, capsys, monkeypatch, login, password):
    code, out, err = ctl_here(capsys, monkeypatch, "auth-test", login, "-c", config,
                              stdin=password + "\n")
    assert (code, out) == (1, "failed: wrong login or password\n"), err


def test_auth_test_password_without_newline(config, capsys, monkeypatch):
    code, out, _ = ctl_here(capsys, monkeypatch, "auth-test", "bob", "-c", config,
                            stdin="bob-password")  # no newline at the end
    assert code == 0 and out.startswith(f"ok: bob authenticated as {BOB_DN} ")


def test_auth_test_reads_the_terminal(embedded_config):
    """With a TTY the password is read without echo, through getpass."""
    pid, fd = pty.fork()
    if pid == 0:  # child: the pty is its controlling terminal
        os.chdir(REPO)
        os.execve(sys.executable, [sys.executable, "-m", "mailserver.ctl", "auth-test", "bob",
                                   "-c", embedded_config], twistd_env())
    output = b""
    try:
        output += _read_until(fd, b"Password: ")
        os.write(fd, b"bob-password\n")
        output += _read_until(fd, None)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, output
    assert b"ok: bob authenticated as " + BOB_DN.encode() in output
    assert b"bob-password" not in output  # not echoed


def _read_until(fd: int, marker, timeout: float = 30.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker is not None and marker in data:
            return data
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # EIO: the child closed the terminal
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"timed out; got {data!r}")


@pytest.mark.ldap
def test_outage_exits_75(tmp_path, slapd_factory):  # noqa: F811
    server = slapd_factory()
    config = write_config(tmp_path, ldap_directory(server.uri))
    assert ctl("lookup", "alice@example.test", "-c", config).returncode == 0
    server.stop()
    done = ctl("lookup", "alice@example.test", "-c", config)
    assert done.returncode == 75, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert "directory unavailable" in done.stderr and "Traceback" not in done.stderr
    done = ctl("auth-test", "alice", "-c", config, stdin="alice-password\n")
    assert done.returncode == 75, (done.stdout, done.stderr)
    assert "failed" not in done.stdout and "directory unavailable" in done.stderr
    server.start()  # and it recovers
    assert ctl("auth-test", "alice", "-c", config, stdin="alice-password\n").returncode == 0


@pytest.mark.ldap
def test_wrong_service_password_is_unavailable_not_unknown(tmp_path, slapd_server):  # noqa: F811
    directory = dict(ldap_directory(slapd_server.uri), bind_password="wrong")
    done = ctl("lookup", "alice@example.test", "-c", write_config(tmp_path, directory))
    assert done.returncode == 75, (done.stdout, done.stderr)


def test_config_errors_exit_78(tmp_path):
    done = ctl("lookup", "alice@example.test", "-c", str(tmp_path / "missing.toml"))
    assert done.returncode == 78
    assert "missing.toml: file not found" in done.stderr


def test_directory_config_errors_exit_78(tmp_path, capsys, monkeypatch):
    bad = write_config(tmp_path, {"backend": "ldif", "ldif_file": str(tmp_path / "no.ldif")})
    code, _, err = ctl_here(capsys, monkeypatch, "auth-test", "alice", "-c", bad, stdin="x\n")
    assert code == 78 and "no.ldif" in err, err
    broken = tmp_path / "broken.ldif"
    broken.write_text("dn: dc=example,dc=test\nnot an attribute line\n")
    bad = write_config(tmp_path, {"backend": "ldif", "ldif_file": str(broken)})
    code, _, err = ctl_here(capsys, monkeypatch, "lookup", "alice@example.test", "-c", bad)
    assert code == 78 and "broken.ldif" in err, err


def test_default_config_path_is_etc(capsys, monkeypatch):
    if os.path.exists("/etc/mailserver/mailserver.toml"):
        pytest.skip("a real configuration is installed here")
    code, _, err = ctl_here(capsys, monkeypatch, "lookup", "alice@example.test")
    assert code == 78
    assert "/etc/mailserver/mailserver.toml" in err


def test_check_config_still_works(embedded_config):
    done = ctl("check-config", embedded_config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{embedded_config}: ok")
