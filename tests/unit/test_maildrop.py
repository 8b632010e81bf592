"""Tests for mailserver.store.maildrop, on a real filesystem."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import os
import stat
import subprocess
import sys
import threading

import pytest
from zope.interface.verify import verifyObject

from mailserver.directory.interfaces import Mailbox
from mailserver.store import maildrop as md
from mailserver.store.interfaces import IMaildrop
from mailserver.store.maildir import MaildirStore
from mailserver.store.maildrop import (
    LOCK_NAME,
    DropMessage,
    Maildrop,
    MaildropInUse,
    MaildropUpdateError,
)

ALICE = Mailbox(address="alice@example.org", login="alice")
BODY = b"Subject: hi\r\n\r\nhello\r\nworld\r\n"


class Clock:
    """A settable clock for MaildirStore that moves one second per delivery,
    so delivery order is known."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        now = self.now
        self.now += 1
        return now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    return MaildirStore(str(tmp_path / "mail"), hostname="mx.example.org", fsync=False, clock=clock)


@pytest.fixture
def maildir(store):
    path = store.maildir_for(ALICE)
    store.ensure_maildir(path)
    return path


def deliver(store, data: bytes = BODY) -> str:
    """Deliver with the production store; return the name in new/."""
    path = store.deliver_bytes(ALICE, sender="bob@example.net", data=data)
    return os.path.basename(path)


def put(maildir: str, sub: str, name: str, data: bytes = b"x\n") -> str:
    path = os.path.join(maildir, sub, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def listing(maildir: str, sub: str) -> list:
    return sorted(os.listdir(os.path.join(maildir, sub)))


def unique_part(name: str) -> str:
    return name.split(":")[0].split(",")[0]


def write_uidlist(maildir: str, text: str) -> None:
    with open(os.path.join(maildir, "dovecot-uidlist"), "w") as f:
        f.write(text)


class SnapshotTests:
    """open() lists new/ and cur/ once, in delivery order."""

    def test_later_delivery_not_in_snapshot(self, store, maildir):
        """A message delivered after open() is not part of the session."""
        first = deliver(store)
        with Maildrop.open(maildir) as drop:
            deliver(store)
            assert [m.name for m in drop.messages] == [first]
            assert len(listing(maildir, "new")) == 2

    def test_order_by_delivery_time(self, store, maildir, clock):
        """Messages are ordered by the seconds and microseconds in their names, not as strings."""
        names = {}
        for label, now in [("c", 1000.000040), ("a", 999.5), ("b", 1000.000005)]:
            clock.now = now
            names[label] = deliver(store)
        put(maildir, "cur", "no-time-here:2,", b"x")
        with Maildrop.open(maildir) as drop:
            assert [m.name for m in drop.messages] == [
                names["a"], names["b"], names["c"], "no-time-here:2,",
            ]
            assert [m.subdir for m in drop.messages] == ["new", "new", "new", "cur"]

    def test_missing_maildir_is_empty(self, tmp_path):
        """A maildir that does not exist yet gives an empty drop and nothing is created."""
        path = str(tmp_path / "nobody")
        with Maildrop.open(path) as drop:
            assert drop.messages == []
            drop.update(deleted=[], retrieved=[])
        assert not os.path.exists(path)

    def test_missing_subdirectory_is_empty(self, tmp_path):
        """A maildir without new/ or cur/ lists nothing from it."""
        maildir = tmp_path / "md"
        (maildir / "cur").mkdir(parents=True)
        put(str(maildir), "cur", "1.M1P1.host:2,S")
        with Maildrop.open(str(maildir)) as drop:
            assert [m.name for m in drop.messages] == ["1.M1P1.host:2,S"]

    def test_dot_files_and_directories_skipped(self, store, maildir):
        """Names starting with a dot and subdirectories are not messages."""
        name = deliver(store)
        put(maildir, "new", ".hidden")
        put(maildir, "cur", ".nfs0001")
        os.mkdir(os.path.join(maildir, "cur", "1.M1P1.dir"))
        with Maildrop.open(maildir) as drop:
            assert [m.name for m in drop.messages] == [name]

    def test_symlinked_entries_skipped(self, store, maildir, tmp_path):
        """A symbolic link in new/ or cur/ is skipped, never followed."""
        name = deliver(store)
        secret = tmp_path / "secret"
        secret.write_bytes(b"private\n")
        os.symlink(str(secret), os.path.join(maildir, "new", "2.M1P1.host,S=8,W=9"))
        os.symlink(str(secret), os.path.join(maildir, "cur", "3.M1P1.host:2,"))
        os.symlink("nowhere", os.path.join(maildir, "cur", "4.M1P1.host:2,"))
        with Maildrop.open(maildir) as drop:
            assert [m.name for m in drop.messages] == [name]

    @pytest.mark.parametrize("sub", ["new", "cur"])
    def test_symlinked_subdirectory_refused(self, maildir, tmp_path, sub):
        """A new/ or cur/ that is a symbolic link is refused with PermissionError."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        put(str(tmp_path), "elsewhere", "1.M1P1.host")
        os.rmdir(os.path.join(maildir, sub))
        os.symlink(str(elsewhere), os.path.join(maildir, sub))
        with pytest.raises(PermissionError, match="symbolic link"):
            Maildrop.open(maildir)
        # The lock was released on the way out.
        os.unlink(os.path.join(maildir, sub))
        os.mkdir(os.path.join(maildir, sub))
        Maildrop.open(maildir).close()

    def test_same_base_in_new_and_cur_listed_once(self, maildir):
        """A message seen in both new/ and cur/ (moved while listing) is listed once, from cur/."""
        put(maildir, "new", "5.M1P1.host,S=2,W=3")
        put(maildir, "cur", "5.M1P1.host,S=2,W=3:2,S")
        with Maildrop.open(maildir) as drop:
            assert drop.messages == [
                DropMessage(name="5.M1P1.host,S=2,W=3:2,S", subdir="cur", uid="5.M1P1.host", size=3)
            ]

    def test_provides_interface(self, store, maildir):
        """Maildrop provides IMaildrop."""
        deliver(store)
        with Maildrop.open(maildir) as drop:
            assert verifyObject(IMaildrop, drop)


class SizeTests:
    """Sizes are octets on the wire, with CRLF line ends."""

    def test_size_of_delivered_message(self, store, maildir):
        """A delivered message's size is the CRLF size of what was delivered."""
        name = deliver(store, BODY)
        with Maildrop.open(maildir) as drop:
            [msg] = drop.messages
            with drop.open_message(0) as f:
                on_disk = f.read()
        assert ",W=" in name
        assert msg.size == len(on_disk.replace(b"\n", b"\r\n"))
        assert on_disk.endswith(BODY.replace(b"\r\n", b"\n"))

    def test_size_from_w_field_is_trusted(self, maildir):
        """The ,W= field gives the size without reading the file."""
        put(maildir, "new", "1.M1P1.host,S=2,W=1234", b"x\n")
        put(maildir, "cur", "2.M1P1.host,W=55,S=9:2,S", b"x\n")
        with Maildrop.open(maildir) as drop:
            assert [m.size for m in drop.messages] == [1234, 55]

    @pytest.mark.parametrize(
        "data, size",
        [
            (b"a\nb\n", 6),
            (b"a\r\nb\r\n", 6),
            (b"a\r\nb\nc", 7),
            (b"\n\n", 4),
            (b"bare\rcr\n", 9),
            (b"", 0),
        ],
    )
    def test_size_computed_without_w_field(self, maildir, data, size):
        """Without ,W= the file is read: its length plus one octet per bare LF."""
        put(maildir, "new", "1.M1P1.host,S=99", data)
        put(maildir, "cur", "2.M1P1.host,W=x:2,", data)
        with Maildrop.open(maildir) as drop:
            assert [m.size for m in drop.messages] == [size, size]

    def test_size_computed_across_chunks(self, maildir, monkeypatch):
        """A CRLF split between two read chunks is not counted as a bare LF."""
        monkeypatch.setattr(md, "_CHUNK_SIZE", 4)
        put(maildir, "new", "1.M1P1.host", b"abc\r\nde\nfgh\r\n\n")
        with Maildrop.open(maildir) as drop:
            assert [m.size for m in drop.messages] == [16]

    def test_large_mailbox_opens_without_reading_messages(self, store, maildir, monkeypatch):
        """20000 messages with ,W= in their names are listed without opening one of them."""
        for n in range(20000):
            fd = os.open(
                os.path.join(maildir, "new", f"{store.unique_name()},S=2,W=3"),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600,
            )
            os.write(fd, b"x\n")
            os.close(fd)
        without_w = put(maildir, "cur", "1.M1P1.host:2,S", b"a\nb\n")
        opened = []
        real_os_open, real_open = os.open, builtins.open

        def os_open(path, *args, **kwargs):
            opened.append(os.fspath(path) if not isinstance(path, int) else path)
            return real_os_open(path, *args, **kwargs)

        def py_open(file, *args, **kwargs):
            opened.append(file)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", py_open)
        monkeypatch.setattr(io, "open", py_open)
        drop = Maildrop.open(maildir)
        monkeypatch.undo()
        with drop:
            assert len(drop.messages) == 20001
            assert {m.size for m in drop.messages[1:]} == {3}
        names = set(listing(maildir, "new"))
        message_opens = [p for p in opened if isinstance(p, str) and os.path.basename(p) in names]
        assert message_opens == []
        # Only the one message without ,W= was opened to be measured.
        assert os.path.basename(without_w) in [p for p in opened if isinstance(p, str)]


class UidlTests:
    """UIDLs come from the unique part of the name and never change."""

    def test_uidl_is_unique_part(self, store, maildir):
        """A delivered message's UIDL is its name up to the first comma."""
        name = deliver(store)
        with Maildrop.open(maildir) as drop:
            [msg] = drop.messages
        assert msg.uid == name.split(",")[0]
        assert 1 <= len(msg.uid) <= 70

    def test_uidl_stable_across_moves_flags_and_update(self, store, maildir):
        """The UIDL is the same in new/, in cur/ with flags, and after update()."""
        name = deliver(store)
        with Maildrop.open(maildir) as drop:
            [before] = drop.messages
            drop.update(deleted=[], retrieved=[0])
        with Maildrop.open(maildir) as drop:
            [after_update] = drop.messages
        assert after_update.name == name + ":2,S"
        os.rename(
            os.path.join(maildir, "cur", after_update.name),
            os.path.join(maildir, "cur", name + ":2,FRS"),
        )
        with Maildrop.open(maildir) as drop:
            [after_flags] = drop.messages
        assert before.uid == after_update.uid == after_flags.uid == unique_part(name)

    @pytest.mark.parametrize(
        "name",
        [
            "1700000000.M1P2Q3R0123456789abcdef." + "h" * 80 + ",S=2,W=3",
            "1700000000.M1P2.host with space",
            "1700000000.M1P2.h\u00e9te",
        ],
    )
    def test_long_or_odd_unique_part_is_hashed(self, maildir, name):
        """A unique part longer than 70 characters or outside 0x21-0x7E becomes a SHA-256 prefix."""
        put(maildir, "new", name)
        with Maildrop.open(maildir) as drop:
            [msg] = drop.messages
        assert msg.uid == hashlib.sha256(unique_part(name).encode()).hexdigest()[:32]

    def test_shared_unique_part_gets_distinct_uidls(self, maildir):
        """Two messages with the same unique part still get different UIDLs."""
        put(maildir, "cur", "1.M1P1.host,S=2:2,S")
        put(maildir, "cur", "1.M1P1.host,S=3:2,S", b"xy\n")
        with Maildrop.open(maildir) as drop:
            uids = [m.uid for m in drop.messages]
        assert uids[0] == "1.M1P1.host"
        assert len(set(uids)) == 2
        assert all(1 <= len(u) <= 70 for u in uids)


class UidlistTests:
    """Dovecot's dovecot-uidlist keeps the UIDLs users already have."""

    def test_version3_with_and_without_p_field(self, store, maildir):
        """A listed message gets its P field, else uid and uidvalidity in 8 hex digits each."""
        a, b, c = deliver(store), deliver(store), deliver(store)
        os.rename(os.path.join(maildir, "new", b), os.path.join(maildir, "cur", b + ":2,S"))
        write_uidlist(
            maildir,
            f"3 V1700000000 N300 Gabcdef0123456789abcdef0123456789\n"
            f"7 W1234 P<old-uidl@example> :{a}\n"
            f"255 W99 :{b}\n",
        )
        with Maildrop.open(maildir) as drop:
            assert drop.uidlist_problem is None
            uids = [m.uid for m in drop.messages]
        assert uids == ["<old-uidl@example>", "000000FF6553F100", unique_part(c)]

    def test_version1(self, store, maildir):
        """Version 1 lists give Dovecot's default UIDL format."""
        a, b = deliver(store), deliver(store)
        write_uidlist(maildir, f"1 12345 10\n3 {a}\n9 {b}:2,S\n")
        with Maildrop.open(maildir) as drop:
            assert drop.uidlist_problem is None
            assert [m.uid for m in drop.messages] == ["0000000300003039", "0000000900003039"]

    def test_uidlist_never_written(self, store, maildir):
        """The uidlist is read, not changed, even by update()."""
        a = deliver(store)
        text = f"3 V1 N2\n1 :{a}\n"
        write_uidlist(maildir, text)
        with Maildrop.open(maildir) as drop:
            drop.update(deleted=[], retrieved=[0])
        with open(os.path.join(maildir, "dovecot-uidlist")) as f:
            assert f.read() == text

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "x V1 N2\n",
            "2 V1 N2\n",
            "3 N2\n",
            "3 V0 N2\n",
            "3 V1 N2\n1 :{a}\n1 :{b}\n",
            "3 V1 N2\nabc :{a}\n",
            "3 V1 N2\n1 W1 {a}\n",
            "3 V1 N2\n1 :sub/{a}\n",
            "3 V1 N2\n1 :{a}\n\n",
            "3 V99999999999 N2\n",
            "1 5\n",
            "1 5 2\n7 {a}\n",
        ],
    )
    def test_malformed_uidlist_ignored(self, store, maildir, text):
        """A broken uidlist is ignored as a whole and the reason is exposed."""
        a, b = deliver(store), deliver(store)
        write_uidlist(maildir, text.format(a=a, b=b))
        with Maildrop.open(maildir) as drop:
            assert drop.uidlist_problem
            assert [m.uid for m in drop.messages] == [unique_part(a), unique_part(b)]

    def test_symlinked_uidlist_ignored(self, store, maildir, tmp_path):
        """A uidlist that is a symbolic link is not followed."""
        a = deliver(store)
        target = tmp_path / "elsewhere-uidlist"
        target.write_text(f"3 V1 N2\n1 :{a}\n")
        os.symlink(str(target), os.path.join(maildir, "dovecot-uidlist"))
        with Maildrop.open(maildir) as drop:
            assert "symbolic link" in drop.uidlist_problem
            assert [m.uid for m in drop.messages] == [unique_part(a)]


class OpenMessageTests:
    """open_message() follows messages that other readers renamed."""

    def test_reads_content(self, store, maildir):
        """The returned file holds the stored message."""
        deliver(store, BODY)
        with Maildrop.open(maildir) as drop:
            with drop.open_message(0) as f:
                assert f.read().endswith(b"hello\nworld\n")
            with pytest.raises(IndexError):
                drop.open_message(1)
            with pytest.raises(IndexError):
                drop.open_message(-1)

    def test_after_other_reader_moved_it_to_cur(self, store, maildir):
        """A message moved to cur/ with flags by another reader is found again."""
        name = deliver(store)
        other = deliver(store)
        with Maildrop.open(maildir) as drop:
            new, cur = os.path.join(maildir, "new"), os.path.join(maildir, "cur")
            os.rename(os.path.join(new, name), os.path.join(cur, name + ":2,FS"))
            os.rename(os.path.join(new, other), os.path.join(cur, other + ":2,"))
            with drop.open_message(0) as f:
                assert f.read().endswith(b"hello\nworld\n")
            os.rename(
                os.path.join(maildir, "cur", name + ":2,FS"),
                os.path.join(maildir, "cur", name + ":2,S"),
            )
            with drop.open_message(0) as f:
                assert f.read()
            with drop.open_message(1) as f:
                assert f.read()
            assert drop.messages[0].name == name  # the snapshot is unchanged

    def test_expunged_message(self, store, maildir):
        """A message deleted by someone else raises FileNotFoundError."""
        name = deliver(store)
        with Maildrop.open(maildir) as drop:
            os.unlink(os.path.join(maildir, "new", name))
            with pytest.raises(FileNotFoundError):
                drop.open_message(0)
            with pytest.raises(FileNotFoundError):
                drop.open_message(0)

    def test_symlink_in_its_place_refused(self, store, maildir, tmp_path):
        """A symbolic link put where the message was is not followed."""
        name = deliver(store)
        secret = tmp_path / "secret"
        secret.write_bytes(b"private")
        with Maildrop.open(maildir) as drop:
            path = os.path.join(maildir, "new", name)
            os.unlink(path)
            os.symlink(str(secret), path)
            with pytest.raises(PermissionError):
                drop.open_message(0)

    def test_read_small_whole_file_where_it_was(self, store, maildir, tmp_path):
        """read_small() returns a small file whole; None when it is larger than
        the limit, moved, gone or a link (open_message() then takes over)."""
        name = deliver(store, BODY)
        deliver(store, BODY + b"x" * 100)
        with Maildrop.open(maildir) as drop:
            content = drop.read_small(0, 1000)
            assert content is not None and content.endswith(b"hello\nworld\n")
            assert drop.read_small(1, 100) is None
            new, cur = os.path.join(maildir, "new"), os.path.join(maildir, "cur")
            os.rename(os.path.join(new, name), os.path.join(cur, name + ":2,S"))
            assert drop.read_small(0, 1000) is None
            with drop.open_message(0) as f:  # found again, and remembered there
                assert f.read() == content
            assert drop.read_small(0, 1000) == content
            secret = tmp_path / "secret"
            secret.write_bytes(b"private")
            os.unlink(os.path.join(cur, name + ":2,S"))
            os.symlink(str(secret), os.path.join(cur, name + ":2,S"))
            assert drop.read_small(0, 1000) is None
            with pytest.raises(IndexError):
                drop.read_small(2, 1000)

    def test_closed_drop_refuses(self, store, maildir):
        """open_message() and update() after close() raise ValueError."""
        deliver(store)
        drop = Maildrop.open(maildir)
        drop.close()
        with pytest.raises(ValueError):
            drop.open_message(0)
        with pytest.raises(ValueError):
            drop.update(deleted=[], retrieved=[])


class UpdateTests:
    """update() deletes, moves to cur/ and sets the S flag."""

    def test_delete_move_and_seen(self, store, maildir):
        """Deleted messages go, others move to cur/ with :2, and retrieved ones get S."""
        names = []
        for _ in range(4):
            names.append(deliver(store))
        flagged = deliver(store)
        os.rename(
            os.path.join(maildir, "new", flagged), os.path.join(maildir, "cur", flagged + ":2,Fa")
        )
        with Maildrop.open(maildir) as drop:
            late = deliver(store)
            drop.update(deleted=[0], retrieved=[1, 4])
        assert listing(maildir, "new") == [late]
        assert listing(maildir, "cur") == sorted(
            [names[1] + ":2,S", names[2] + ":2,", names[3] + ":2,", flagged + ":2,FSa"]
        )

    def test_deleted_and_retrieved_is_deleted(self, store, maildir):
        """A message both retrieved and deleted is deleted."""
        deliver(store)
        with Maildrop.open(maildir) as drop:
            drop.update(deleted=[0], retrieved=[0])
        assert listing(maildir, "new") == listing(maildir, "cur") == []

    def test_flags_kept_and_second_flag_set_kept(self, maildir):
        """Existing flags stay, S is merged in order, and data after a second comma is kept."""
        put(maildir, "cur", "1.M1P1.host:2,RT")
        put(maildir, "cur", "2.M1P1.host:2,S")
        put(maildir, "cur", "3.M1P1.host:2,F,extra")
        put(maildir, "cur", "4.M1P1.host:1,old")
        put(maildir, "cur", "5.M1P1.host:2,D")
        with Maildrop.open(maildir) as drop:
            drop.update(deleted=[], retrieved=[0, 1, 2, 3])
        assert listing(maildir, "cur") == [
            "1.M1P1.host:2,RST", "2.M1P1.host:2,S", "3.M1P1.host:2,FS,extra",
            "4.M1P1.host:2,S", "5.M1P1.host:2,D",
        ]

    def test_file_already_gone(self, store, maildir):
        """Messages removed by someone else are not an error, for deletion or moving."""
        a, b, c = deliver(store), deliver(store), deliver(store)
        with Maildrop.open(maildir) as drop:
            os.unlink(os.path.join(maildir, "new", a))
            os.unlink(os.path.join(maildir, "new", b))
            drop.update(deleted=[0], retrieved=[1])
        assert listing(maildir, "new") == []
        assert listing(maildir, "cur") == [c + ":2,"]

    def test_follows_renames_by_other_readers(self, store, maildir):
        """update() finds messages another reader moved to cur/ and keeps their flags."""
        a, b = deliver(store), deliver(store)
        with Maildrop.open(maildir) as drop:
            os.rename(os.path.join(maildir, "new", a), os.path.join(maildir, "cur", a + ":2,F"))
            os.rename(os.path.join(maildir, "new", b), os.path.join(maildir, "cur", b + ":2,R"))
            drop.update(deleted=[0], retrieved=[1])
        assert listing(maildir, "new") == []
        assert listing(maildir, "cur") == [b + ":2,RS"]

    def test_directories_fsynced_once(self, store, maildir, monkeypatch):
        """new/ and cur/ are each fsynced once, at the end."""
        for _ in range(3):
            deliver(store)
        synced = []
        real_fsync = os.fsync

        def fsync(fd):
            synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
            real_fsync(fd)

        with Maildrop.open(maildir) as drop:
            monkeypatch.setattr(os, "fsync", fsync)
            drop.update(deleted=[0], retrieved=[1])
        assert synced == [True, True]

    def test_failures_collected(self, store, maildir, monkeypatch):
        """A failure on one file does not stop the others and is raised at the end."""
        _, b, c = deliver(store), deliver(store), deliver(store)
        real_rename = os.rename

        def rename(src, dst, **kwargs):
            if src == b:
                raise OSError(errno.EIO, "I/O error")
            return real_rename(src, dst, **kwargs)

        monkeypatch.setattr(os, "rename", rename)
        with Maildrop.open(maildir) as drop:
            with pytest.raises(MaildropUpdateError) as info:
                drop.update(deleted=[0], retrieved=[2])
        assert isinstance(info.value, OSError)
        assert [(path, exc.errno) for path, exc in info.value.failures] == [(f"new/{b}", errno.EIO)]
        assert listing(maildir, "new") == [b]
        assert listing(maildir, "cur") == [c + ":2,S"]

    def test_needs_io_only_when_something_changes(self, store, maildir):
        """needs_io() is False only when update() has nothing to delete, move
        or flag; then update() makes no system call that changes anything."""
        deliver(store), deliver(store)
        with Maildrop.open(maildir) as drop:
            assert drop.needs_io([], [])  # both still in new/
            drop.update(deleted=[], retrieved=[0])
        with Maildrop.open(maildir) as drop:
            assert not drop.needs_io([], [0])  # already S
            assert not drop.needs_io([], [])
            assert drop.needs_io([], [1])  # seen, not yet read
            assert drop.needs_io([1], [])
            before = listing(maildir, "cur")
            drop.update(deleted=[], retrieved=[0])
            assert listing(maildir, "cur") == before

    def test_untouched_messages_not_examined(self, store, maildir, monkeypatch):
        """update() looks only at the deleted, retrieved and new/ messages."""
        for _ in range(5):
            deliver(store)
        with Maildrop.open(maildir) as drop:
            drop.update(deleted=[], retrieved=[])  # all to cur/
        looked = []
        with Maildrop.open(maildir) as drop:
            real_apply = drop._apply

            def apply(index, *args):
                looked.append(index)
                return real_apply(index, *args)

            monkeypatch.setattr(drop, "_apply", apply)
            drop.update(deleted=[3], retrieved=[1])
        assert looked == [1, 3]
        assert len(listing(maildir, "cur")) == 4

    def test_bad_index(self, store, maildir):
        """An index outside the drop raises IndexError before anything changes."""
        deliver(store)
        with Maildrop.open(maildir) as drop:
            with pytest.raises(IndexError):
                drop.update(deleted=[0, 5], retrieved=[])
        assert len(listing(maildir, "new")) == 1


LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


class LockTests:
    """One POP3 session per maildir at a time."""

    def test_second_open_in_use(self, store, maildir):
        """A second open() of a locked maildir raises MaildropInUse, in the same process too."""
        deliver(store)
        drop = Maildrop.open(maildir)
        with pytest.raises(MaildropInUse):
            Maildrop.open(maildir)
        drop.close()
        drop.close()
        with Maildrop.open(maildir) as again:
            assert len(again.messages) == 1

    def test_lock_file(self, maildir):
        """The lock file is a 0600 regular file in the maildir."""
        with Maildrop.open(maildir):
            st = os.lstat(os.path.join(maildir, LOCK_NAME))
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600

    def test_symlinked_lock_file_refused(self, maildir, tmp_path):
        """A lock file that is a symbolic link is refused, not followed."""
        os.symlink(str(tmp_path / "target"), os.path.join(maildir, LOCK_NAME))
        with pytest.raises(PermissionError):
            Maildrop.open(maildir)
        assert not (tmp_path / "target").exists()

    def test_timeout_waits_for_release(self, maildir):
        """With lock_timeout, open() waits for the other session to close."""
        first = Maildrop.open(maildir)
        timer = threading.Timer(0.1, first.close)
        timer.start()
        try:
            with Maildrop.open(maildir, lock_timeout=30):
                pass
        finally:
            timer.cancel()
            first.close()

    def test_lock_of_killed_process_is_free(self, maildir):
        """A lock held by a process killed with SIGKILL is released by the kernel."""
        holder = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, os.path.join(maildir, LOCK_NAME)],
            stdout=subprocess.PIPE,
        )
        try:
            assert holder.stdout.readline() == b"locked\n"
            with pytest.raises(MaildropInUse):
                Maildrop.open(maildir, lock_timeout=0.1)
        finally:
            holder.kill()
            holder.wait()
            holder.stdout.close()
        with Maildrop.open(maildir) as drop:
            assert drop.messages == []

    def test_forgotten_drop_releases_lock(self, maildir):
        """A drop dropped without close() releases its lock when collected."""
        Maildrop.open(maildir)
        import gc

        gc.collect()
        Maildrop.open(maildir).close()
