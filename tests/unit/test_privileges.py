"""Who the server runs as, and the directories it hands to that user before the switch."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from mailserver.config import load_config
from mailserver.errors import ConfigError
from mailserver.privileges import Identity, _allows, identity, prepare

CONFIG = """
[server]
spool_dir = "spool"
{server}
[domains]
local = ["example.test"]
[directory]
ldif_file = "users.ldif"
[store]
maildir_root = "mail"
[queue]
directory = "queue"
[[listeners]]
address = "127.0.0.1:2525"
[[listeners]]
protocol = "lmtp"
address = "unix:run/lmtp.sock"
"""


def config(d: Path, server: str = ""):
    (d / "users.ldif").write_text("")
    (d / "users.ldif").chmod(0o644)
    path = d / "c.toml"
    path.write_text(CONFIG.format(server=f"base_dir = \"{d}\"\n{server}"))
    return load_config(str(path))


NOBODY = pwd.getpwnam("nobody")
WHO = Identity(NOBODY.pw_uid, NOBODY.pw_gid, "nobody", (NOBODY.pw_gid,))


def test_not_root_never_switches(tmp_path):
    """Started as an ordinary user, no switch is planned whatever the file says."""
    c = config(tmp_path, 'user = "nobody"')
    assert identity(c, euid=1000) is None


def test_root_without_a_user_is_refused(tmp_path):
    """Root with nobody to switch to is refused, naming the two ways out."""
    with pytest.raises(ConfigError) as e:
        identity(config(tmp_path), euid=0)
    assert "server.user: refusing to run as root" in str(e.value)
    assert "--uid" in str(e.value) and "allow_root = true" in str(e.value)


def test_allow_root_runs_as_root(tmp_path):
    """With allow_root, root runs without a switch."""
    assert identity(config(tmp_path, "allow_root = true"), euid=0) is None


def test_user_key_gives_its_primary_group(tmp_path):
    """[server] user alone switches to that user and its primary group."""
    who = identity(config(tmp_path, 'user = "nobody"'), euid=0)
    assert (who.uid, who.gid, who.name) == (NOBODY.pw_uid, NOBODY.pw_gid, "nobody")


def test_twistd_options_win(tmp_path):
    """twistd's --uid/--gid win over [server] user/group."""
    c = config(tmp_path, 'user = "root"\ngroup = "root"')
    who = identity(c, uid=NOBODY.pw_uid, gid=4242, euid=0)
    assert (who.uid, who.gid) == (NOBODY.pw_uid, 4242)


def test_unknown_user_names_the_key(tmp_path):
    """A user that does not exist is a configuration error on server.user."""
    with pytest.raises(ConfigError, match="server.user: no such user 'no-such-user-x'"):
        identity(config(tmp_path, 'user = "no-such-user-x"'), euid=0)


@pytest.mark.parametrize("mode, owner, group, bits, allowed", [
    (0o700, True, False, os.W_OK | os.X_OK, True),
    (0o070, True, False, os.W_OK, False),  # the owner's bits decide for the owner
    (0o070, False, True, os.W_OK | os.X_OK, True),
    (0o705, False, False, os.R_OK | os.X_OK, True),
    (0o750, False, False, os.X_OK, False),
])
def test_permission_bits_judged_for_the_user(mode, owner, group, bits, allowed):
    """Owner, group and other bits are read as the kernel would for the service user."""
    st = SimpleNamespace(st_mode=stat.S_IFDIR | mode, st_uid=WHO.uid if owner else 0,
                         st_gid=WHO.gid if group else 12345)
    assert _allows(st, WHO, bits) is allowed


@pytest.fixture
def open_dir():
    """A directory the service user can traverse."""
    d = tempfile.mkdtemp(prefix="mailserver-priv-", dir="/tmp")
    os.chmod(d, 0o711)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def test_fresh_directories_are_made_private_and_given_away(open_dir):
    """Spool, queue, maildir root and the socket directory are made and owned by the user."""
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    prepare(config(open_dir), WHO)
    for d in ("spool", "spool/incoming", "queue", "queue/active", "queue/data", "mail", "run"):
        st = os.stat(open_dir / d)
        assert st.st_uid == WHO.uid, d
        assert stat.S_IMODE(st.st_mode) == (0o750 if d == "run" else 0o700), d


def test_existing_directory_closed_to_the_user_is_refused(open_dir):
    """A root-owned queue left by an earlier start as root is named with its fix."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a root-owned directory")
    (open_dir / "queue").mkdir(mode=0o700)
    with pytest.raises(ConfigError) as e:
        prepare(config(open_dir), WHO)
    assert str(e.value).endswith(f"queue.directory: {open_dir}/queue: not writable by user "
                                 f"nobody; run: chown -R nobody:{WHO.group_name} "
                                 f"{open_dir}/queue")


def test_unreachable_directory_is_refused(tmp_path):
    """A directory under a path the user cannot enter is refused, naming the closed one."""
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    c = config(closed)
    if os.stat(closed).st_uid == WHO.uid:
        pytest.skip("running as the test user")
    with pytest.raises(ConfigError, match="user nobody cannot reach it"):
        prepare(c, WHO)


def test_unreadable_ldif_is_refused(open_dir):
    """The LDIF file, re-read at SIGHUP, must be readable by the user."""
    c = config(open_dir)
    (open_dir / "users.ldif").chmod(0o600)
    if os.stat(open_dir / "users.ldif").st_uid == WHO.uid:
        pytest.skip("running as the test user")
    with pytest.raises(ConfigError, match="directory.ldif_file: .*not readable by user nobody"):
        prepare(c, WHO)


def test_without_a_switch_directories_are_still_made(tmp_path):
    """Without a user to hand them to, the directories are made with the same modes."""
    prepare(config(tmp_path), None)
    assert stat.S_IMODE(os.stat(tmp_path / "queue" / "hold").st_mode) == 0o700


def test_twistd_is_told_to_switch_to_the_user_key(tmp_path, monkeypatch):
    """With [server] user, makeService sets twistd's uid and gid so twistd switches."""
    from mailserver import tap

    if os.geteuid() != 0:
        pytest.skip("the user key counts only as root")
    options = tap.Options()
    options.config = config(tmp_path, 'user = "nobody"')
    options.parent = {"uid": None, "gid": None}
    built = []
    monkeypatch.setattr("mailserver.service.build_service",
                        lambda c, identity=None, **kw: built.append(identity) or "service")
    assert tap.makeService(options) == "service"
    assert options.parent == {"uid": NOBODY.pw_uid, "gid": NOBODY.pw_gid}
    assert built[0].name == "nobody"


def test_refusal_is_one_line_at_make_service(tmp_path):
    """A refusal ends makeService with SystemExit carrying one line."""
    from mailserver import tap

    if os.geteuid() != 0:
        pytest.skip("needs root")
    options = tap.Options()
    options.config = config(tmp_path)
    options.parent = {"uid": None, "gid": None}
    with pytest.raises(SystemExit) as e:
        tap.makeService(options)
    assert str(e.value).startswith("mailserver: ") and "\n" not in str(e.value)



def test_twistd_gid_with_the_user_key(tmp_path):
    """twistd's --gid alone combines with [server] user; the group key then counts for nothing."""
    c = config(tmp_path, 'user = "nobody"\ngroup = "root"')
    who = identity(c, gid=4242, euid=0)
    assert (who.uid, who.gid) == (NOBODY.pw_uid, 4242)
