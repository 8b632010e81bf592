"""How the whole-server service stops: thread pools last."""

from __future__ import annotations

import os

from twisted.application import service
from twisted.internet import defer
from twisted.python.threadpool import ThreadPool

from mailserver.service import MailService, ThreadPoolService


class SlowStop(service.Service):
    """Stops when told to by the test, like the queue waiting for deliveries."""

    def __init__(self) -> None:
        self.stopping = defer.Deferred()

    def stopService(self):
        super().stopService()
        return self.stopping


def test_thread_pools_stop_after_the_services_that_use_them():
    top = MailService(config=None, tls=None)
    pool = ThreadPool(minthreads=0, maxthreads=1)
    ThreadPoolService(pool).setServiceParent(top)
    slow = SlowStop()
    slow.setServiceParent(top)
    service.MultiService.startService(top)  # children only: no signal handlers here
    assert pool.started

    done = top.stopService()
    # The queue is still finishing: its writes must still find a worker thread.
    assert not pool.joined
    assert not done.called

    slow.stopping.callback(None)
    assert pool.joined
    assert done.called
    assert not top.running


def test_queued_local_recipients_can_forward(tmp_path, monkeypatch):
    """The server wires the queue's local target to the outbox (forwards of a
    queued recipient are queued again) and to SRS when it is configured."""
    import shutil

    from twisted.internet.testing import MemoryReactorClock

    from mailserver.config import load_config
    from mailserver.queue.manager import QueueManager
    from mailserver.service import build_service
    from tests.support.slapd import ROOT

    (tmp_path / "etc").mkdir()
    shutil.copy(ROOT / "etc" / "quickstart-users.ldif", tmp_path / "etc")
    text = (ROOT / "etc" / "quickstart.toml").read_text()
    text = text.replace("[relay]", "[relay]\nsrs_secret = \"s3cret\"") if "[relay]" in text \
        else text + "\n[relay]\nsrs_secret = \"s3cret\"\n"
    (tmp_path / "etc" / "quickstart.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    top = build_service(load_config("etc/quickstart.toml"), MemoryReactorClock())
    [manager] = [s for s in top if isinstance(s, QueueManager)]
    local = manager.router.local_target
    assert local.outbox is not None and local.srs is not None


def test_maildir_tmp_cleaner_runs_on_the_server_clock(tmp_path, monkeypatch):
    """The server includes the tmp/ cleaner for its store root, ticking on the injected reactor's clock."""
    import shutil

    from twisted.internet.testing import MemoryReactorClock

    from mailserver.config import load_config
    from mailserver.service import build_service
    from mailserver.store.tmpclean import TmpCleaner
    from tests.support.slapd import ROOT

    (tmp_path / "etc").mkdir()
    shutil.copy(ROOT / "etc" / "quickstart-users.ldif", tmp_path / "etc")
    shutil.copy(ROOT / "etc" / "quickstart.toml", tmp_path / "etc")
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/quickstart.toml")
    reactor = MemoryReactorClock()
    top = build_service(config, reactor)
    [cleaner] = [s for s in top if isinstance(s, TmpCleaner)]
    assert cleaner.root == os.path.abspath(config.store.maildir_root)
    assert cleaner.clock is reactor
    cleaner.startService()
    assert [c.getTime() for c in reactor.getDelayedCalls()] == [cleaner.interval]
    cleaner.stopService()
    assert reactor.getDelayedCalls() == []
