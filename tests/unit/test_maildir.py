"""Tests for mailserver.store.maildir, on a real filesystem."""

from __future__ import annotations

import errno
import mailbox
import os
import re
import stat
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from mailserver import errors
from mailserver.directory.interfaces import Mailbox
from mailserver.reply import STORAGE_FULL
from mailserver.store import maildir as md
from mailserver.store.interfaces import IDelivery, IMailStore
from mailserver.store.maildir import (
    MaildirStore,
    MaildirLinkRefused,
    UnsafeMailboxPath,
    cleanup_tmp,
    encode_component,
)

ALICE = Mailbox(address="alice@example.org", login="alice")
MESSAGE = (
    b"From: Bob <bob@example.net>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"first line\r\n"
    b"second line\r\n"
)
RECEIVED = (
    b"Received: from client.example.net by mx.example.org;"
    b" Mon, 1 Jan 2024 00:00:00 +0000\r\n"
)
NAME_RE = re.compile(
    r"^(?P<secs>\d+)\.M(?P<usecs>\d+)P(?P<pid>\d+)Q(?P<q>\d+)R(?P<rand>[0-9a-f]{16})"
    r"\.(?P<host>[^,:/]+),S=(?P<size>\d+),W=(?P<vsize>\d+)$"
)


@pytest.fixture
def store(tmp_path):
    return MaildirStore(str(tmp_path / "mail"), hostname="mx.example.org")


def write_source(tmp_path, data: bytes) -> str:
    path = tmp_path / "source.eml"
    path.write_bytes(data)
    return str(path)


def listing(path) -> list:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


class DeliverTests:
    """A delivered message is a valid maildir message with our headers."""

    __test__ = True  # collected although not named Test*

    def test_python_mailbox_reads_it(self, store, tmp_path):
        """Python's mailbox.Maildir reads the message with headers and body intact."""
        path = store.deliver(
            ALICE, sender="bob@example.net", source_path=write_source(tmp_path, MESSAGE),
            prefix=RECEIVED,
        )
        maildir = store.maildir_for(ALICE)
        assert os.path.dirname(path) == os.path.join(maildir, "new")
        box = mailbox.Maildir(maildir, factory=None, create=False)
        [msg] = list(box)
        assert msg["Return-Path"] == "<bob@example.net>"
        assert msg["Delivered-To"] == "alice@example.org"
        assert msg["Received"].startswith("from client.example.net")
        assert msg["Subject"] == "hello"
        assert msg.get_payload() == "first line\nsecond line\n"

    def test_file_layout_and_line_endings(self, store, tmp_path):
        """On disk: Return-Path, Delivered-To, prefix, content, all with LF endings."""
        path = store.deliver(
            ALICE, sender="bob@example.net", source_path=write_source(tmp_path, MESSAGE),
            prefix=RECEIVED,
        )
        with open(path, "rb") as f:
            data = f.read()
        assert b"\r" not in data
        assert data == (
            b"Return-Path: <bob@example.net>\n"
            b"Delivered-To: alice@example.org\n"
            + RECEIVED.replace(b"\r\n", b"\n")
            + MESSAGE.replace(b"\r\n", b"\n")
        )

    def test_null_sender(self, store):
        """The null sender is written as Return-Path: <>."""
        path = store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        with open(path, "rb") as f:
            assert f.readline() == b"Return-Path: <>\n"

    def test_size_fields(self, store):
        """S= is the size on disk and W= the size with CRLF line endings."""
        path = store.deliver_bytes(ALICE, sender="bob@example.net", data=MESSAGE, prefix=RECEIVED)
        match = NAME_RE.match(os.path.basename(path))
        assert match, path
        with open(path, "rb") as f:
            data = f.read()
        assert int(match["size"]) == len(data) == os.path.getsize(path)
        assert int(match["vsize"]) == len(data.replace(b"\n", b"\r\n"))

    def test_tmp_empty_and_modes(self, store):
        """After delivery tmp/ is empty; directories are 0700 and the message 0600."""
        path = store.deliver_bytes(ALICE, sender="bob@example.net", data=MESSAGE)
        maildir = store.maildir_for(ALICE)
        assert listing(os.path.join(maildir, "tmp")) == []
        assert listing(os.path.join(maildir, "cur")) == []
        for sub in ("", "cur", "new", "tmp"):
            assert stat.S_IMODE(os.stat(os.path.join(maildir, sub)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    def test_empty_and_unterminated_content(self, store):
        """Empty content and content without a final CRLF are stored as given."""
        path = store.deliver_bytes(ALICE, sender="a@b.example", data=b"")
        with open(path, "rb") as f:
            assert f.read().endswith(b"Delivered-To: alice@example.org\n")
        path = store.deliver_bytes(ALICE, sender="a@b.example", data=b"\r\nbody\r")
        with open(path, "rb") as f:
            assert f.read().endswith(b"alice@example.org\n\nbody\r")

    def test_begin_write_commit(self, store):
        """The begin/write/commit API streams content written in small pieces."""
        with store.begin(ALICE, sender="bob@example.net") as delivery:
            assert verifyObject(IDelivery, delivery)
            for i in range(0, len(MESSAGE), 3):
                delivery.write(MESSAGE[i : i + 3])
            path = delivery.commit()
        with open(path, "rb") as f:
            assert f.read().endswith(MESSAGE.replace(b"\r\n", b"\n"))

    def test_abort_leaves_nothing(self, store):
        """Aborting (or leaving the with-block without commit) removes the tmp file."""
        maildir = store.maildir_for(ALICE)
        with store.begin(ALICE, sender="bob@example.net") as delivery:
            delivery.write(MESSAGE)
            assert os.path.exists(delivery.path)
        assert listing(os.path.join(maildir, "tmp")) == []
        assert listing(os.path.join(maildir, "new")) == []
        with pytest.raises(ValueError):
            delivery.write(b"more")

    def test_refuses_header_injection(self, store):
        """CR/LF in the envelope and an unterminated prefix are refused before any file is made."""
        with pytest.raises(ValueError):
            store.deliver_bytes(ALICE, sender="a@b\r\nBcc: x@y", data=MESSAGE)
        with pytest.raises(ValueError):
            store.deliver_bytes(ALICE, sender="a@b", data=MESSAGE, prefix=b"X-Foo: bar")
        assert not os.path.exists(store.maildir_for(ALICE))

    def test_interface(self, store):
        """MaildirStore provides IMailStore."""
        assert verifyObject(IMailStore, store)

    def test_creates_in_existing_partial_maildir(self, store):
        """A maildir missing some of cur/new/tmp gets them created."""
        maildir = store.maildir_for(ALICE)
        os.makedirs(os.path.join(maildir, "new"))
        store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        assert listing(maildir) == ["cur", "new", "tmp"]

    def test_custom_template(self, tmp_path):
        """The template may use {domain}, {localpart} and {login}; unknown fields fail early."""
        store = MaildirStore(str(tmp_path), template="{domain}/users/{login}/Maildir")
        mb = Mailbox(address="a.b@example.org", login="AB")
        assert store.maildir_for(mb) == os.path.join(
            str(tmp_path), "example.org", "users", "ab", "Maildir"
        )
        with pytest.raises(ValueError):
            MaildirStore(str(tmp_path), template="{domain}/{uid}")
        with pytest.raises(ValueError):
            MaildirStore(str(tmp_path), template="../{domain}/{localpart}")


class DurabilityTests:
    """The tmp -> fsync -> link -> fsync(new) order, and failures."""

    __test__ = True  # collected although not named Test*

    def test_order_of_operations(self, store, monkeypatch):
        """The file is fsynced before the link into new/, and new/ is fsynced after it."""
        store.ensure_maildir(store.maildir_for(ALICE))
        events = []
        real_fsync, real_link = os.fsync, os.link

        def fsync(fd):
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def link(src, dst, **kwargs):
            events.append(("link", dst))
            real_link(src, dst, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "link", link)
        path = store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        maildir = store.maildir_for(ALICE)
        assert [kind for kind, _ in events] == ["fsync", "link", "fsync"]
        assert events[0][1].startswith(os.path.join(os.path.realpath(maildir), "tmp") + "/")
        assert events[1][1] == os.path.basename(path)  # linked through new/'s descriptor
        assert events[2][1] == os.path.join(os.path.realpath(maildir), "new")

    def test_enospc_at_fsync(self, store, monkeypatch):
        """ENOSPC while syncing leaves nothing in new/ or tmp/ and surfaces as OSError(ENOSPC)."""
        maildir = store.maildir_for(ALICE)
        store.ensure_maildir(maildir)

        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(OSError) as caught:
            store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        assert caught.value.errno == errno.ENOSPC
        assert errors.to_reply(caught.value) == STORAGE_FULL
        assert listing(os.path.join(maildir, "new")) == []
        assert listing(os.path.join(maildir, "tmp")) == []

    def test_enospc_in_fresh_maildir(self, store, monkeypatch):
        """A failure while creating the maildir raises and leaves no message behind."""
        def fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(OSError) as caught:
            store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        assert caught.value.errno == errno.ENOSPC
        maildir = store.maildir_for(ALICE)
        assert listing(os.path.join(maildir, "new")) == []
        assert listing(os.path.join(maildir, "tmp")) == []
        monkeypatch.undo()
        store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        assert len(listing(os.path.join(maildir, "new"))) == 1

    def test_edquot_during_write(self, store, tmp_path, monkeypatch):
        """EDQUOT while reading/writing content aborts the transaction with that errno."""
        maildir = store.maildir_for(ALICE)
        real_write = md.MaildirDelivery.write
        calls = []

        def write(self, data):
            calls.append(data)
            if len(calls) == 3:
                raise OSError(errno.EDQUOT, "Disk quota exceeded")
            real_write(self, data)

        monkeypatch.setattr(md.MaildirDelivery, "write", write)
        small = MaildirStore(store.root, hostname="h", chunk_size=8)
        with pytest.raises(OSError) as caught:
            small.deliver(ALICE, sender="", source_path=write_source(tmp_path, MESSAGE))
        assert caught.value.errno == errno.EDQUOT
        assert listing(os.path.join(maildir, "new")) == []
        assert listing(os.path.join(maildir, "tmp")) == []

    def test_missing_source_creates_nothing(self, store, tmp_path):
        """A missing source file raises before any tmp file exists."""
        with pytest.raises(FileNotFoundError):
            store.deliver(ALICE, sender="", source_path=str(tmp_path / "nope"))
        assert listing(os.path.join(store.maildir_for(ALICE), "tmp")) == []

    def test_rename_fallback(self, store, monkeypatch):
        """Where hard links are not supported the tmp file is renamed into new/."""
        def link(src, dst, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", link)
        path = store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        maildir = store.maildir_for(ALICE)
        assert listing(os.path.join(maildir, "new")) == [os.path.basename(path)]
        assert listing(os.path.join(maildir, "tmp")) == []

    @pytest.mark.parametrize("hard_links", [True, False])
    def test_name_collision_is_an_error(self, store, monkeypatch, hard_links):
        """A name already in new/ is never overwritten, with link or with rename."""
        monkeypatch.setattr(store, "unique_name", lambda: "1.M1P1Q1Rfixed.h")
        if not hard_links:
            def link(src, dst, **kwargs):
                raise OSError(errno.EXDEV, "Invalid cross-device link")

            monkeypatch.setattr(os, "link", link)
        store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        with pytest.raises(FileExistsError):
            store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        maildir = store.maildir_for(ALICE)
        assert len(listing(os.path.join(maildir, "new"))) == 1
        assert listing(os.path.join(maildir, "tmp")) == []

    def test_fsync_false_never_syncs(self, tmp_path, monkeypatch):
        """fsync=False (benchmarks only) performs no fsync at all."""
        store = MaildirStore(str(tmp_path), fsync=False)

        def fsync(fd):
            raise AssertionError("fsync called")

        monkeypatch.setattr(os, "fsync", fsync)
        store.deliver_bytes(ALICE, sender="", data=MESSAGE)

    def test_crash_leaves_only_tmp(self, store):
        """A message written but never committed is invisible to readers."""
        delivery = store.begin(ALICE, sender="", prefix=RECEIVED)
        delivery.write(MESSAGE)
        delivery._buffer.flush()  # "crash" here: no commit, no abort
        maildir = store.maildir_for(ALICE)
        assert listing(os.path.join(maildir, "new")) == []
        assert len(listing(os.path.join(maildir, "tmp"))) == 1
        assert len(mailbox.Maildir(maildir, factory=None, create=False)) == 0
        delivery.abort()


class CleanupTmpTests:
    """cleanup_tmp removes abandoned tmp files only."""

    __test__ = True  # collected although not named Test*

    def test_removes_only_old_regular_files(self, store):
        """Files older than the limit go; fresh files, directories and new/ stay."""
        maildir = store.maildir_for(ALICE)
        store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        tmp = os.path.join(maildir, "tmp")
        old = os.path.join(tmp, "old")
        with open(old, "wb") as f:
            f.write(b"partial")
        os.mkdir(os.path.join(tmp, "adir"))
        now = time.time()
        assert cleanup_tmp(maildir, now=now) == []
        removed = cleanup_tmp(maildir, now=now + md.TMP_MAX_AGE + 60)
        assert removed == [old]
        assert listing(tmp) == ["adir"]
        assert len(listing(os.path.join(maildir, "new"))) == 1

    def test_missing_maildir(self, tmp_path):
        """A maildir without tmp/ has nothing to clean."""
        assert cleanup_tmp(str(tmp_path / "none")) == []

    def test_linked_tmp_is_not_entered(self, tmp_path):
        """A tmp/ that is a symbolic link is not cleaned through the link."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        victim = elsewhere / "victim"
        victim.write_bytes(b"keep")
        os.utime(str(victim), (0, 0))
        maildir = tmp_path / "box"
        maildir.mkdir()
        os.symlink(str(elsewhere), str(maildir / "tmp"))
        assert cleanup_tmp(str(maildir), now=time.time() + 2 * md.TMP_MAX_AGE) == []  # ctime too
        assert victim.exists()


class NameTests:
    """Unique names."""

    __test__ = True  # collected although not named Test*

    def test_format(self, tmp_path):
        """Names follow <secs>.M<usecs>P<pid>Q<n>R<hex>.<host> with the hostname escaped."""
        store = MaildirStore(str(tmp_path), hostname="a/b:c,d", clock=lambda: 1700000000.25)
        name = store.unique_name()
        m = re.match(r"^1700000000\.M250000P(\d+)Q(\d+)R([0-9a-f]{16})\.(.*)$", name)
        assert m, name
        assert int(m[1]) == os.getpid()
        assert m[4] == "a\\057b\\072c\\054d"

    def test_thousand_unique_names_fast(self, tmp_path):
        """1000 names generated at the same instant are all distinct, and quickly so."""
        store = MaildirStore(str(tmp_path), hostname="h", clock=lambda: 1.0)
        start = time.perf_counter()
        names = [store.unique_name() for _ in range(1000)]
        assert time.perf_counter() - start < 1.0
        assert len(set(names)) == 1000

    def test_two_stores_same_clock(self, tmp_path):
        """Two stores (as two workers would) never produce the same name."""
        a = MaildirStore(str(tmp_path), hostname="h", clock=lambda: 1.0)
        b = MaildirStore(str(tmp_path), hostname="h", clock=lambda: 1.0)
        names = {a.unique_name() for _ in range(200)} | {b.unique_name() for _ in range(200)}
        assert len(names) == 400


class CRLFTests:
    """CRLF -> LF conversion is independent of how the content is chunked."""

    __test__ = True  # collected although not named Test*

    @pytest.mark.parametrize("chunk_size", [1, 2, 3, 7])
    def test_crlf_split_across_chunks(self, tmp_path, chunk_size):
        """A CR ending one read and its LF starting the next still make one LF."""
        store = MaildirStore(str(tmp_path / "m"), hostname="h", chunk_size=chunk_size)
        content = b"A: b\r\n\r\nx\r\n\r\ny\rz\r\r\n\r"
        path = store.deliver(ALICE, sender="", source_path=write_source(tmp_path, content))
        with open(path, "rb") as f:
            data = f.read()
        assert data.split(b"alice@example.org\n", 1)[1] == b"A: b\n\nx\n\ny\rz\r\n\r"

    @settings(max_examples=200, deadline=None)
    @given(
        data=st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"bc"]), max_size=30),
        cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=10),
    )
    def test_any_chunking_same_result(self, data, cuts):
        """Feeding the same bytes in any pieces gives the same output as one replace."""
        content = b"".join(data)
        bounds = sorted({c for c in cuts if c <= len(content)} | {0, len(content)})
        conv = md._CRLFToLF()
        out = b"".join(conv.feed(content[a:b]) for a, b in zip(bounds, bounds[1:]))
        out += conv.flush()
        assert out == content.replace(b"\r\n", b"\n")


class PathSafetyTests:
    """Maildir paths never leave the root."""

    __test__ = True  # collected although not named Test*

    @pytest.mark.parametrize(
        "address",
        [
            "../x@example.org",
            "..@example.org",
            "a/b@example.org",
            ".hidden@example.org",
            "nul\0byte@example.org",
            "x@..",
            "x@../../etc",
            "x@.",
            "../../../etc/passwd@example.org",
            "x@example.org/../../..",
            "%2E%2E@example.org",
            "a\\b@example.org",
            "tab\there@example.org",
            "ünïcode@exämple.org",
            "\"a@b\"@example.org",
        ],
    )
    def test_stays_inside_root(self, store, address):
        """Dangerous local parts and domains map to a path strictly inside the root."""
        path = store.maildir_for(Mailbox(address=address, login="x"))
        root = os.path.realpath(store.root)
        rel = os.path.relpath(os.path.realpath(path), root)
        parts = rel.split(os.sep)
        assert len(parts) == 2
        assert not rel.startswith("..")
        for part in parts:
            assert part not in (".", "..") and not part.startswith(".")
            assert "\0" not in part and "/" not in part
            assert re.fullmatch(r"[a-z0-9._+=%A-F~-]+", part), part

    def test_delivery_with_hostile_address(self, store):
        """A delivery to a hostile address lands inside the root."""
        mb = Mailbox(address="../../escape@../evil", login="x")
        path = store.deliver_bytes(mb, sender="", data=MESSAGE)
        assert os.path.realpath(path).startswith(os.path.realpath(store.root) + os.sep)
        assert not os.path.exists(os.path.join(os.path.dirname(store.root), "evil"))

    def test_encoding_is_one_to_one(self):
        """Different parts never encode alike (no collisions via %, case of escapes)."""
        samples = ["a.b", "a%2Eb", ".ab", "%2Eab", "a/b", "a%2Fb", "A", "a", "a~b", "-x"]
        encoded = [encode_component(s) for s in samples]
        assert len(set(encoded) - {"a"}) == len(samples) - 2  # "A" and "a" are the same mailbox
        assert encode_component(".") == "%2E"
        assert encode_component("..") == "%2E."

    def test_very_long_names(self, store):
        """Long parts are shortened under NAME_MAX, stay distinct and can be created."""
        a = Mailbox(address="x" * 300 + "@" + "d" * 250 + ".example", login="x")
        b = Mailbox(address="x" * 299 + "y@" + "d" * 250 + ".example", login="x")
        pa, pb = store.maildir_for(a), store.maildir_for(b)
        assert pa != pb
        for part in os.path.relpath(pa, store.root).split(os.sep):
            assert len(part.encode()) <= 200
        assert len(encode_component("\0" * 300)) <= 200
        store.deliver_bytes(a, sender="", data=MESSAGE)
        store.deliver_bytes(b, sender="", data=MESSAGE)

    @pytest.mark.parametrize("address", ["noat", "@example.org", "user@", ""])
    def test_unusable_addresses(self, store, address):
        """Addresses without both parts are a permanent failure."""
        with pytest.raises(UnsafeMailboxPath) as caught:
            store.maildir_for(Mailbox(address=address, login="x"))
        assert isinstance(caught.value, errors.PermFailure)
        assert isinstance(caught.value, ValueError)
        assert caught.value.reply.code == 550

    def test_symlink_escape_refused(self, store, tmp_path):
        """A symbolic link inside the root pointing outside it is refused with
        a temporary failure (451: fixed on disk, the sender retries)."""
        outside = tmp_path / "outside"
        outside.mkdir()
        os.makedirs(store.root)
        os.symlink(str(outside), os.path.join(store.root, "example.org"))
        with pytest.raises(MaildirLinkRefused) as e:
            store.maildir_for(ALICE)
        assert e.value.reply.code == 451
        with pytest.raises(MaildirLinkRefused):
            store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        assert list(outside.iterdir()) == []

    def test_path_resolving_to_root_refused(self, tmp_path):
        """A maildir that resolves to the root itself (through a link) is refused, for now."""
        store = MaildirStore(str(tmp_path / "root"), template="{domain}", hostname="h")
        os.makedirs(store.root)
        os.symlink(".", os.path.join(store.root, "example.org"))
        with pytest.raises(MaildirLinkRefused):
            store.maildir_for(ALICE)

    def test_symlinked_root_allowed(self, tmp_path):
        """The root itself may be a symbolic link."""
        real = tmp_path / "real"
        real.mkdir()
        os.symlink(str(real), str(tmp_path / "link"))
        store = MaildirStore(str(tmp_path / "link"), hostname="h")
        path = store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        assert os.path.exists(os.path.join(str(real), "example.org", "alice", "new",
                                           os.path.basename(path)))


_DELIVER_MANY = """
import sys
from mailserver.directory.interfaces import Mailbox
from mailserver.store.maildir import MaildirStore
store = MaildirStore(sys.argv[1], hostname="h")
box = Mailbox(address="alice@example.org", login="alice")
for _ in range(int(sys.argv[2])):
    print(store.deliver_bytes(box, sender="", data=DATA))
"""


class ConcurrencyTests:
    """Concurrent deliveries into one maildir all land, each under its own name."""

    __test__ = True  # collected although not named Test*

    def test_threads(self, tmp_path):
        """Eight threads delivering 25 messages each leave 200 distinct messages."""
        store = MaildirStore(str(tmp_path), hostname="h")
        results, failures = [], []
        barrier = threading.Barrier(8)

        def worker():
            barrier.wait()
            try:
                for _ in range(25):
                    results.append(store.deliver_bytes(ALICE, sender="", data=MESSAGE))
            except BaseException as exc:  # pragma: no cover - reported below
                failures.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        maildir = store.maildir_for(ALICE)
        assert len(set(results)) == 200
        assert len(listing(os.path.join(maildir, "new"))) == 200
        assert listing(os.path.join(maildir, "tmp")) == []
        assert len(mailbox.Maildir(maildir, factory=None, create=False)) == 200

    def test_processes(self, tmp_path):
        """Several processes sharing one maildir (worker processes) never collide."""
        # Separate interpreters, not a fork of this (threaded) pytest process.
        script = _DELIVER_MANY.replace("DATA", repr(MESSAGE))
        procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path), "20"],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
                 for _ in range(4)]
        batches = []
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0
            batches.append(out.decode().split())
        paths = [p for batch in batches for p in batch]
        assert len(set(paths)) == 80
        maildir = os.path.join(str(tmp_path), "example.org", "alice")
        assert len(listing(os.path.join(maildir, "new"))) == 80


def _tree(path) -> list:
    """Every file below ``path`` (relative names), for "nothing written there"."""
    found = []
    for dirpath, _dirs, files in os.walk(str(path)):
        found.extend(os.path.relpath(os.path.join(dirpath, f), str(path)) for f in files)
    return sorted(found)


class SymlinkRefusalTests:
    """No maildir path component below the root is followed when it is a symbolic link."""

    __test__ = True  # collected although not named Test*

    def _link_component(self, store, tmp_path, component: str, outside: bool):
        """Replace one component of alice's maildir path by a link to a ready
        maildir-shaped target; return the target."""
        maildir = store.maildir_for(ALICE)
        store.ensure_maildir(maildir)
        base = tmp_path / "outside" if outside else os.path.join(store.root, "target")
        target = str(base)
        os.makedirs(target)
        link = {
            "domain": os.path.join(store.root, "example.org"),
            "user": maildir,
            "tmp": os.path.join(maildir, "tmp"),
            "new": os.path.join(maildir, "new"),
            "cur": os.path.join(maildir, "cur"),
        }[component]
        if component in ("domain", "user"):
            inner = os.path.join(target, "alice") if component == "domain" else target
            for sub in ("cur", "new", "tmp"):
                os.makedirs(os.path.join(inner, sub))
        import shutil

        shutil.rmtree(link)
        os.symlink(target, link)
        return target

    @pytest.mark.parametrize("component,outside", [
        ("domain", False), ("user", False),
        ("tmp", False), ("new", False), ("cur", False),
        ("tmp", True), ("new", True), ("cur", True),
    ])
    def test_linked_component_refused_with_451(self, store, tmp_path, component, outside):
        """A symlinked domain, user, tmp/, new/ or cur/ directory is a 451 4.3.0 and nothing is written through it."""
        target = self._link_component(store, tmp_path, component, outside)
        before = _tree(target)
        with pytest.raises(errors.TempFailure) as caught:
            store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        assert isinstance(caught.value, md.MaildirLinkRefused)
        assert errors.to_reply(caught.value).code == 451
        assert str(errors.to_reply(caught.value)).startswith("451 4.3.0")
        assert errors.is_known(caught.value)
        assert _tree(target) == before

    def test_link_swapped_in_after_the_path_check_refused(self, store, tmp_path, monkeypatch):
        """A link that appears after the path is computed (a race, or after
        RCPT time's maildir_for check) is still refused, not followed."""
        outside = tmp_path / "outside"
        for sub in ("cur", "new", "tmp"):
            os.makedirs(outside / "alice" / sub)
        os.makedirs(store.root)
        real_plain_path = store._plain_path

        def racing_plain_path(mailbox):
            path = real_plain_path(mailbox)
            if not os.path.lexists(os.path.join(store.root, "example.org")):
                os.symlink(str(outside), os.path.join(store.root, "example.org"))
            return path

        monkeypatch.setattr(store, "_plain_path", racing_plain_path)
        with pytest.raises(md.MaildirLinkRefused):
            store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        assert _tree(outside) == []

    def test_linked_message_name_in_tmp_not_followed(self, store, tmp_path, monkeypatch):
        """A link planted in tmp/ under the next message name is never written through."""
        maildir = store.maildir_for(ALICE)
        store.ensure_maildir(maildir)
        victim = tmp_path / "victim"
        victim.write_bytes(b"keep")
        monkeypatch.setattr(store, "unique_name", lambda: "1.M1P1Q1Rfixed.h")
        os.symlink(str(victim), os.path.join(maildir, "tmp", "1.M1P1Q1Rfixed.h"))
        with pytest.raises(FileExistsError):
            store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        assert victim.read_bytes() == b"keep"

    def test_normal_delivery_after_refusal(self, store, tmp_path):
        """Once the link is replaced by a real directory, delivery works again."""
        self._link_component(store, tmp_path, "new", True)
        with pytest.raises(md.MaildirLinkRefused):
            store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        new = os.path.join(store.maildir_for(ALICE), "new")
        os.unlink(new)
        os.mkdir(new)
        path = store.deliver_bytes(ALICE, sender="", data=MESSAGE)
        assert os.path.dirname(path) == new
        assert listing(os.path.join(store.maildir_for(ALICE), "tmp")) == []


FORGED = (
    b"Return-Path: <forged@evil.example>\r\n"
    b"From: Bob <bob@example.net>\r\n"
    b"return-path :\r\n"
    b"\t<folded@evil.example>\r\n"
    b"Subject: hello\r\n"
    b"Delivered-To: someone-else@example.org\r\n"
    b"\r\n"
    b"Return-Path: <in-the-body@example.net>\r\n"
)


class TraceHeaderTests:
    """The sender's Return-Path fields are dropped while copying; Delivered-To for this mailbox is a loop."""

    __test__ = True  # collected although not named Test*

    def _stored(self, path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    @pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 13, 64 * 1024])
    def test_senders_return_path_removed_in_any_chunking(self, tmp_path, chunk_size):
        """Every Return-Path field of the sender, folded or not, leaves the header section; ours and the body stay."""
        store = MaildirStore(str(tmp_path / "mail"), hostname="h", chunk_size=chunk_size)
        path = store.deliver(ALICE, sender="bob@example.net", prefix=RECEIVED,
                             source_path=write_source(tmp_path, FORGED))
        data = self._stored(path)
        assert data == (
            b"Return-Path: <bob@example.net>\n"
            b"Delivered-To: alice@example.org\n"
            + RECEIVED.replace(b"\r\n", b"\n")
            + b"From: Bob <bob@example.net>\n"
            b"Subject: hello\n"
            b"Delivered-To: someone-else@example.org\n"
            b"\n"
            b"Return-Path: <in-the-body@example.net>\n"
        )
        name = os.path.basename(path)
        assert f",S={len(data)}," in name
        assert name.endswith(",W=%d" % (len(data) + data.count(b"\n")))

    def test_header_only_message_and_lf_endings(self, store):
        """A message that is only a header (no blank line, bare LFs) loses its Return-Path too."""
        path = store.deliver_bytes(ALICE, sender="", data=b"Return-Path: <x@y>\nSubject: s")
        assert self._stored(path).endswith(b"Delivered-To: alice@example.org\nSubject: s")

    def test_return_path_like_names_kept(self, store):
        """Fields that only start like Return-Path (Return-Path-X:, Return-Pathway:) are kept."""
        data = b"Return-Path-X: a\r\nReturn-Pathway: b\r\n\r\nbody\r\n"
        path = store.deliver_bytes(ALICE, sender="", data=data)
        assert self._stored(path).endswith(b"Return-Path-X: a\nReturn-Pathway: b\n\nbody\n")

    @pytest.mark.parametrize("value", [
        b"alice@example.org", b"<Alice@Example.ORG>", b"  alice@example.org  ",
    ])
    def test_delivered_to_this_mailbox_is_a_loop(self, store, value):
        """A Delivered-To naming this mailbox (any case, brackets, spaces) refuses the copy with 554 5.4.6 and stores nothing."""
        data = b"Subject: x\r\nDelivered-To: " + value + b"\r\n\r\nbody\r\n"
        with pytest.raises(errors.PermFailure) as caught:
            store.deliver_bytes(ALICE, sender="bob@example.net", data=data)
        assert str(caught.value.reply).startswith("554 5.4.6")
        maildir = store.maildir_for(ALICE)
        assert listing(os.path.join(maildir, "new")) == []
        assert listing(os.path.join(maildir, "tmp")) == []

    def test_loop_not_hidden_behind_many_forged_delivered_to(self, tmp_path):
        """Our Delivered-To after a thousand forged ones, across chunk boundaries, is still a loop."""
        store = MaildirStore(str(tmp_path / "mail"), hostname="h", chunk_size=5)
        forged = b"".join(b"Delivered-To: u%d@example.org\r\n" % i for i in range(1000))
        data = forged + b"Delivered-To:\r\n alice@example.org\r\n\r\nbody\r\n"
        with pytest.raises(errors.PermFailure):
            store.deliver(ALICE, sender="", source_path=write_source(tmp_path, data))

    def test_forged_delivered_to_elsewhere_is_no_loop(self, store):
        """A Delivered-To for another mailbox, or one in the body, is delivered and kept."""
        data = (b"Delivered-To: bob@example.org\r\nDelivered-To: alice@example.org.evil\r\n"
                b"\r\nDelivered-To: alice@example.org\r\n")
        path = store.deliver_bytes(ALICE, sender="", data=data)
        assert self._stored(path).endswith(
            b"Delivered-To: bob@example.org\nDelivered-To: alice@example.org.evil\n"
            b"\nDelivered-To: alice@example.org\n")


def _reference_trace_filter(data: bytes) -> bytes:
    """The header filter done the slow way, on the whole message at once."""
    lines = data.split(b"\n")
    out, dropping, in_header = [], False, True
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        text = line if last else line + b"\n"
        if in_header:
            if line in (b"", b"\r") and not last:
                in_header = False
                out.append(text)
                continue
            if line[:1] in (b" ", b"\t"):
                if not dropping:
                    out.append(text)
                continue
            name, colon, _ = line.partition(b":")
            dropping = bool(colon) and name.strip(b" \t").lower() == b"return-path"
            if not dropping:
                out.append(text)
        else:
            out.append(text)
    return b"".join(out)


_HEADER_LINES = st.sampled_from([
    b"Return-Path: <a@b>\r\n", b"return-PATH :x\r\n", b" folded\r\n", b"\tfolded\r\n",
    b"Subject: s\r\n", b"Return-Pathway: k\r\n", b"X: y\n", b"no colon\r\n", b"\r\n",
    b"body line\r\n", b"Return-Path: <c@d>\n",
])


@given(parts=st.lists(_HEADER_LINES, max_size=12), cuts=st.lists(st.integers(1, 9), max_size=20))
@settings(max_examples=200, deadline=None)
def test_trace_filter_any_chunking_matches_the_reference(parts, cuts):
    """However the content is cut into chunks, the streaming filter gives what the whole-message reference gives."""
    data = b"".join(parts)
    f = md._TraceFilter("alice@example.org")
    out, pos = [], 0
    for cut in cuts:
        out.append(f.feed(data[pos : pos + cut]))
        pos += cut
    out.append(f.feed(data[pos:]))
    out.append(f.flush())
    assert b"".join(out) == _reference_trace_filter(data)


class DirectoryFsyncSharingTests:
    """Concurrent deliveries into one maildir share the fsync of ``new/``."""

    def test_fsync_begun_after_a_link_covers_it(self, tmp_path, monkeypatch):
        """Three deliveries: the first fsyncs alone; the two that linked while
        it ran need one more fsync between them, never none."""
        syncs = md._DirSyncs()
        calls, started, release = [], threading.Event(), threading.Event()
        real_fsync = os.fsync

        def slow_fsync(fd):
            calls.append(fd)
            if len(calls) == 1:
                started.set()
                assert release.wait(10)
            real_fsync(fd)

        monkeypatch.setattr(md.os, "fsync", slow_fsync)
        fds = [os.open(str(tmp_path), os.O_RDONLY) for _ in range(3)]
        try:
            first = threading.Thread(target=syncs.fsync, args=(fds[0],))
            first.start()
            assert started.wait(10)
            later = [threading.Thread(target=syncs.fsync, args=(fd,)) for fd in fds[1:]]
            for t in later:
                t.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # both have their tickets
                entry = next(iter(syncs._dirs.values()))
                if entry.linked == 3:
                    break
                time.sleep(0.001)
            release.set()
            for t in [first, *later]:
                t.join(10)
        finally:
            for fd in fds:
                os.close(fd)
        assert len(calls) == 2
        assert syncs._dirs == {}

    def test_failed_fsync_covers_nobody(self, tmp_path, monkeypatch):
        """An fsync that fails raises for its delivery; the next one fsyncs again."""
        syncs = md._DirSyncs()
        calls = []

        def failing_once(fd):
            calls.append(fd)
            if len(calls) == 1:
                raise OSError(5, "Input/output error")

        monkeypatch.setattr(md.os, "fsync", failing_once)
        fd = os.open(str(tmp_path), os.O_RDONLY)
        try:
            with pytest.raises(OSError):
                syncs.fsync(fd)
            syncs.fsync(fd)
        finally:
            os.close(fd)
        assert len(calls) == 2
