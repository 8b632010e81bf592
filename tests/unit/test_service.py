"""How the whole-server service stops: thread pools last."""

from __future__ import annotations

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
