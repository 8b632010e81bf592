"""Tests for the scheduled maildir tmp/ cleaner (mailserver.store.tmpclean)."""

from __future__ import annotations

import os

import pytest
from twisted.internet import defer, task

from mailserver.store import tmpclean
from mailserver.store.maildir import TMP_MAX_AGE
from mailserver.store.tmpclean import TmpCleaner, iter_maildirs

NOW = 1_800_000_000.0


def make_maildir(root, *parts) -> str:
    path = os.path.join(str(root), *parts)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(path, sub), exist_ok=True)
    return path


def tmp_file(maildir: str, name: str, age: float) -> str:
    path = os.path.join(maildir, "tmp", name)
    with open(path, "wb") as f:
        f.write(b"partial")
    t = NOW - age
    os.utime(path, (t, t))
    return path


def synchronous(f, *args):
    return defer.maybeDeferred(f, *args)


@pytest.fixture
def clock():
    return task.Clock()


def cleaner(root, clock, **kw) -> TmpCleaner:
    kw.setdefault("interval", 60)
    kw.setdefault("batch", 10)
    return TmpCleaner(str(root), clock, synchronous, now=lambda: NOW, **kw)


def test_tick_removes_old_tmp_files_and_keeps_fresh_ones(tmp_path, clock):
    """After one interval, tmp/ files older than 36 hours are gone and younger ones stay."""
    box = make_maildir(tmp_path, "example.org", "alice")
    old = tmp_file(box, "old", TMP_MAX_AGE + 60)
    fresh = tmp_file(box, "fresh", 3600)
    svc = cleaner(tmp_path, clock)
    svc.startService()
    clock.advance(59)
    assert os.path.exists(old)  # nothing before the first interval
    clock.advance(1)
    assert not os.path.exists(old)
    assert os.path.exists(fresh)
    assert svc.removed_total == 1
    svc.stopService()


def test_a_tick_touches_at_most_batch_maildirs_and_resumes(tmp_path, clock, monkeypatch):
    """Each tick cleans at most ``batch`` maildirs, resuming where the previous tick stopped, then starts over."""
    boxes = [make_maildir(tmp_path, "example.org", f"user{i}") for i in range(5)]
    for box in boxes:
        tmp_file(box, "old", TMP_MAX_AGE + 60)
    seen = []
    real = tmpclean.cleanup_tmp

    def counting(maildir, *args, **kwargs):
        seen.append(maildir)
        return real(maildir, *args, **kwargs)

    monkeypatch.setattr(tmpclean, "cleanup_tmp", counting)
    svc = cleaner(tmp_path, clock, batch=2)
    svc.startService()
    clock.advance(60)
    assert seen == boxes[:2]
    clock.advance(60)
    assert seen == boxes[:4]
    clock.advance(60)
    assert seen == boxes  # the end of the walk: this tick stops short
    clock.advance(60)
    assert seen == boxes + boxes[:2]  # a new pass
    assert all(os.listdir(os.path.join(b, "tmp")) == [] for b in boxes)
    svc.stopService()
    clock.advance(600)
    assert len(seen) == 7  # stopped: no more ticks


def test_walk_finds_maildirs_and_folders_without_following_links(tmp_path):
    """The walk yields maildirs and Maildir++ folders, never through a symbolic link."""
    a = make_maildir(tmp_path, "example.org", "alice")
    folder = make_maildir(tmp_path, "example.org", "alice", ".Sent")
    outside = make_maildir(tmp_path.parent / (tmp_path.name + "-outside"), "x")
    os.symlink(outside, os.path.join(str(tmp_path), "example.org", "linked"))
    assert list(iter_maildirs(str(tmp_path))) == [a, folder]


def test_linked_tmp_not_cleaned(tmp_path, clock):
    """A maildir whose tmp/ is a symbolic link is not cleaned through the link."""
    box = os.path.join(str(tmp_path), "example.org", "bob")
    os.makedirs(os.path.join(box, "cur"))
    os.makedirs(os.path.join(box, "new"))
    elsewhere = make_maildir(tmp_path.parent / (tmp_path.name + "-elsewhere"), "m")
    victim = tmp_file(elsewhere, "victim", TMP_MAX_AGE * 2)
    os.symlink(os.path.join(elsewhere, "tmp"), os.path.join(box, "tmp"))
    svc = cleaner(tmp_path, clock)
    svc.startService()
    clock.advance(60)
    assert os.path.exists(victim)
    svc.stopService()


def test_failing_maildir_does_not_stop_the_tick_or_the_schedule(tmp_path, clock, monkeypatch):
    """An error on one maildir is logged, the others in the tick are still cleaned, and later ticks run."""
    a = make_maildir(tmp_path, "example.org", "alice")
    b = make_maildir(tmp_path, "example.org", "bob")
    old_b = tmp_file(b, "old", TMP_MAX_AGE + 60)
    calls = []
    real = tmpclean.cleanup_tmp

    def broken_for_alice(maildir, *args, **kwargs):
        calls.append(maildir)
        if maildir == a:
            raise RuntimeError("boom")
        return real(maildir, *args, **kwargs)

    monkeypatch.setattr(tmpclean, "cleanup_tmp", broken_for_alice)
    svc = cleaner(tmp_path, clock)
    svc.startService()
    clock.advance(60)
    assert calls == [a, b]
    assert not os.path.exists(old_b)
    clock.advance(60)
    assert calls == [a, b, a, b]
    svc.stopService()


def test_missing_root_is_harmless(tmp_path, clock):
    """A store root that does not exist yet gives empty ticks."""
    svc = cleaner(tmp_path / "nothing-yet", clock)
    svc.startService()
    clock.advance(60)
    assert svc.removed_total == 0
    svc.stopService()
