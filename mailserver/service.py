# -*- test-case-name: tests.integration.test_server -*-
"""Assemble the running server from a validated :class:`~mailserver.config.Config`.

:func:`build_service` returns a ``MultiService``: one
``StreamServerEndpointService`` per listener, the I/O thread pool, and the
directory.  Nothing here parses protocol bytes; it only wires the parts
together, with the reactor injected.
"""

from __future__ import annotations

import os
import signal
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints, threads
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailserver import sdnotify
from mailserver.config import Config, load_config, parse_address
from mailserver.directory.reloadable import ReloadableDirectory
from mailserver.errors import ConfigError
from mailserver.delivery.local import LocalDelivery
from mailserver.delivery.recipients import RecipientDelivery
from mailserver.listeners import Parts, build_listener
from mailserver.policy import Networks
from mailserver.incoming import sweep_incoming
from mailserver.store.maildir import MaildirStore
from mailserver.tls import ReloadableTLS, make_self_signed

log = Logger(namespace="mailserver")


def make_endpoint(reactor, address: str, socket_mode: int = 0o660):
    """A server endpoint for a listener address (see ``parse_address``)."""
    kind, host, port = parse_address(address)
    if kind == "unix":
        # flock on <socket>.lock, held for the life of the process: a restart
        # after a crash removes the stale socket (see mailserver.unixlock).
        from mailserver.unixlock import LockedUNIXServerEndpoint

        return LockedUNIXServerEndpoint(reactor, host, mode=socket_mode)
    if kind == "tcp6":
        return endpoints.TCP6ServerEndpoint(reactor, port, interface=host)
    return endpoints.TCP4ServerEndpoint(reactor, port, interface=host)


class ThreadPoolService(service.Service):
    """Starts and stops a thread pool with the application."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class DirectoryService(service.Service):
    """Owns the directory: builds backends (at start and on reload) on one
    bounded LDAP thread pool, and closes them at shutdown."""

    def __init__(self, config: Config, reactor, pool: ThreadPool, metrics=None) -> None:
        self.reactor = reactor
        self.pool = pool
        self.metrics = metrics
        self.directory = ReloadableDirectory(self.backend(config))

    def backend(self, config: Config):
        """A new backend for ``config``, behind its cache when one is wanted."""
        from mailserver.directory.cache import CachingDirectory
        from mailserver.directory.factory import directory_from_config

        d = config.directory
        backend = directory_from_config(d, config.domains.local, self.reactor, self.pool,
                                        relay_domains=config.domains.relay)
        # Always behind the cache: with cache_size = 0 nothing is kept, but
        # simultaneous lookups of one address still share a single query.
        return CachingDirectory(backend, clock=self.reactor, positive_ttl=d.cache_ttl,
                                negative_ttl=d.negative_cache_ttl, max_entries=d.cache_size,
                                metrics=self.metrics)

    def reload(self, config: Config) -> None:
        """Swap in a backend built from ``config``; close the old one after."""
        old = self.directory.swap(self.backend(config))
        # Lookups already running on the old backend finish on the pool first.
        self.reactor.callLater(max(config.directory.operation_timeout, 1.0), old.close)

    def stopService(self) -> None:
        super().stopService()
        self.directory.close()


class PoolService(service.Service):
    """Closes idle outbound connections at shutdown."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def stopService(self):
        super().stopService()
        return defer.ensureDeferred(self.pool.close())


def _stop_reactor(reactor) -> None:
    """Stop once: a second SIGTERM during the graceful stop changes nothing."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


class ListenerService(StreamServerEndpointService):
    """One listener that stops gracefully: it stops listening at once, then
    drains its sessions (see :mod:`mailserver.protocols.sessions`); the
    Deferred from ``stopService`` fires when the last one has gone or the
    grace period has ended."""

    def __init__(self, endpoint, factory, grace: float, clock) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True
        inner = getattr(factory, "wrappedFactory", factory)  # under implicit TLS
        self.sessions = inner.ctx.sessions
        self.grace = grace
        self.clock = clock

    def stopService(self):
        stopped = super().stopService()
        drained = self.sessions.drain(self.grace, self.clock)
        return defer.DeferredList([stopped, drained], consumeErrors=True)


def worker_count(config: Config) -> int:
    """``[server] workers``, 0 being one per core."""
    return config.server.workers or os.cpu_count() or 1


class MailService(service.MultiService):
    """The whole server.  Binding failures end the process with one line.

    ``role``: ``"single"`` (everything in one process), ``"supervisor"``
    (binds, runs the queue and the shared state, takes no connection) or
    ``"worker"`` (takes connections on sockets its supervisor bound; owns no
    spool clean-up, see :mod:`mailserver.workers`)."""

    def __init__(self, config: Config, tls, role: str = "single") -> None:
        super().__init__()
        self.config = config
        self.tls = tls
        self.role = role
        self.workers = None  # workers.supervisor.WorkerPool under a supervisor
        self.notes: list[str] = []  # said at start, once logging is running
        self.log_observer = None  # mailserver.logs.MailLogObserver when [log] asks for one
        self.identity = None  # privileges.Identity twistd switches to, or None

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            where = f"{e.interface or '*'}:{e.port}"
            if isinstance(e.port, (bytes, str)):
                port = e.port.decode() if isinstance(e.port, bytes) else e.port
                where = f"unix:{port}"
            sys.__stderr__.write(f"mailserver: {self.config.path}: cannot listen on "
                                 f"{where}: {e.socketError}\n")
            sys.exit(1)
        except OSError as e:
            sys.__stderr__.write(f"mailserver: {self.config.path}: cannot listen: {e}\n")
            sys.exit(1)
        if self.identity is not None:  # bound as root: the sockets go to the service user
            for lc in self.config.listeners:
                kind, path, _port = parse_address(lc.address)
                if kind == "unix":
                    os.chown(path, self.identity.uid, self.identity.gid)
                    os.chown(path + ".lock", self.identity.uid, self.identity.gid,
                             follow_symlinks=False)

    def setServiceParent(self, parent) -> None:
        super().setServiceParent(parent)
        # twistd's AppLogger uses the application's ILogObserver component,
        # when there is one, instead of building its own observer.
        if self.log_observer is not None and hasattr(parent, "setComponent"):
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, self.log_observer)

    def startService(self) -> None:
        # Now running as the service user (twistd switched after binding).
        # Scratch files are swept by the one process that owns the spool,
        # before any worker starts writing them.
        removed = sweep_incoming(self.config.server.spool_dir) if self.role != "worker" else 0
        if removed:
            self.notes.append(f"removed {removed} incomplete message(s) left in the spool")
        super().startService()
        from twisted.internet import reactor

        if self.log_observer is not None and hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda *a: reactor.callFromThread(
                self.reopen_logs))
        for note in self.notes:
            log.info("{note}", note=note)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, lambda *a: reactor.callFromThread(self.reload))
            # SIGTERM is the normal way to stop (systemd, kill): after the
            # graceful stop, exit 0 rather than dying of the signal again as
            # twistd's own handler has it.  Installed once the reactor runs,
            # after its handlers.
            reactor.callWhenRunning(
                signal.signal, signal.SIGTERM,
                lambda *a: reactor.callFromThread(_stop_reactor, reactor))
        if self.role == "single":
            # Every listener was bound in privilegedStartService: ready.
            self.announce()
        # A supervisor announces once its workers serve; a worker tells its
        # supervisor (mailserver.workers).

    def announce(self, how: str = "") -> None:
        """Log the start line and tell systemd the server is ready."""
        log.info("mailserver started: {n} listener(s) for {domains}{how}",
                 n=len(self.config.listeners),
                 domains=", ".join(self.config.domains.local + self.config.domains.relay),
                 how=how)
        sdnotify.notify("READY=1\nSTATUS=accepting mail")

    def stopService(self):
        """SIGTERM.  The listeners first: they stop accepting at once and drain
        their sessions (at most ``server.shutdown_grace`` seconds), which
        still use the directory, the queue and the pools.  Then the queue and
        the directory, and the thread pools only once those have finished:
        work still in flight (a delivery writing its outcome to the spool)
        needs a worker thread."""
        service.Service.stopService(self)
        sdnotify.notify("STOPPING=1")
        # The listeners (or the workers, which own them) stop first.
        listeners = [s for s in self if isinstance(s, ListenerService) or s is self.workers]
        pools = [s for s in self if isinstance(s, ThreadPoolService)]
        others = [s for s in reversed(list(self)) if s not in pools and s not in listeners]
        # Sessions still draining need the directory, the queue and the pools.
        if listeners:
            log.info("mailserver stopping: no new connections; transactions in flight get "
                     "{grace} s", grace=listeners[0].grace)

        async def stop():
            await defer.DeferredList([defer.maybeDeferred(s.stopService) for s in listeners])
            await defer.DeferredList([defer.maybeDeferred(s.stopService) for s in others])
            for p in pools:
                p.stopService()
            # Pools joined: nothing writes scratch files any more.  What is
            # left was never answered 250; remove it now, not at next start.
            if self.config is not None and self.role != "worker":
                sweep_incoming(self.config.server.spool_dir)

        return defer.ensureDeferred(stop())

    def reload(self) -> None:
        """SIGHUP: re-read the config file, the TLS certificate and the
        directory settings (emptying its cache); connections stay up.  A bad
        file is logged and changes nothing.  Listeners, limits and thread
        pools keep the values they started with."""
        if self.role == "worker":
            self._reload()
            return
        sdnotify.notify(sdnotify.reloading())
        try:
            self._reload()
            if self.workers is not None:
                self.workers.signal(signal.SIGHUP)  # each re-reads the same file
        finally:
            sdnotify.notify("READY=1")

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen ``[log] file`` (logrotate moved it away), here and
        in every worker, which writes its own lines to it."""
        self.log_observer.reopen()
        if self.workers is not None:
            self.workers.signal(signal.SIGUSR1)

    def _reload(self) -> None:
        try:
            config = load_config(self.config.path)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: {e}", e=str(e))
            return
        if self.tls is not None:
            try:
                self.tls.reload()
                log.info("reloaded TLS certificate {path}", path=self.tls.cert_path)
            except ValueError as e:
                log.error("TLS reload failed, keeping the old certificate: {e}", e=e)
        try:
            self.directory_service.reload(config)
        except ValueError as e:
            log.error("directory reload failed, keeping the old settings: {e}", e=e)
            return
        log.info("reloaded directory settings ({backend}), cache emptied",
                 backend=config.directory.backend)


def build_directory(config: Config, reactor, parent: MailService,
                    metrics=None) -> ReloadableDirectory:
    """The directory named by ``[directory]``, on its own bounded thread pool
    (so a slow LDAP server never starves disk writes)."""
    pool = ThreadPool(minthreads=0, maxthreads=config.directory.pool_size, name="mailserver-ldap")
    ThreadPoolService(pool).setServiceParent(parent)
    parent.directory_service = DirectoryService(config, reactor, pool, metrics)
    parent.directory_service.setServiceParent(parent)
    return parent.directory_service.directory


def make_resolver(nameservers, reactor):
    """A twisted.names resolver: only the configured servers (never a
    fallback to 127.0.0.1:53), or the system's /etc/resolv.conf and hosts."""
    from twisted.names import client

    from mailserver.msgauth.lookups import nameserver_addresses

    if not nameservers:
        return client.createResolver()
    servers = nameserver_addresses(nameservers)
    return client.Resolver(servers=servers, reactor=reactor, timeout=(2, 5))


def _trust_root(ca_file: str):
    from twisted.internet import ssl

    if not ca_file:
        return ssl.platformTrust()
    with open(ca_file, "rb") as f:
        return ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(p) for p in _pem_blocks(f.read())])


def _pem_blocks(data: bytes) -> list:
    marker = b"-----BEGIN CERTIFICATE-----"
    return [marker + p for p in data.split(marker)[1:]]


def build_queue(config: Config, reactor, parent: MailService, directory, delivery, pool,
                srs=None, metrics=None, signer=None):
    """The outbound queue: spool, routing, remote delivery and the manager.
    Returns the :class:`~mailserver.queue.outbox.Outbox` listeners queue into."""
    from mailserver.delivery.local import LocalTarget
    from mailserver.delivery.loops import OwnListeners
    from mailserver.delivery.remote import RemoteDelivery, TLSPolicy
    from mailserver.delivery.routing import Router
    from mailserver.delivery.tlsplan import build_security
    from mailserver.protocols.outbound import Timeouts
    from mailserver.protocols.outbound_pool import OutboundConnectionPool
    from mailserver.queue.manager import QueueManager, Schedule
    from mailserver.queue.spool import QueueSpool
    from mailserver.queue.outbox import Outbox

    relay, q = config.relay, config.queue
    # Reuse: several messages per connection to one destination.
    connections = OutboundConnectionPool(reactor,
                                         timeouts=Timeouts(connect=relay.connect_timeout))
    PoolService(connections).setServiceParent(parent)
    deliver_to_host = connections.deliver_to_host
    helo = relay.helo_name or config.server.hostname
    policies = {"*": relay.tls, **relay.tls_policies}
    needs_roots = "verify" in policies.values()
    trust = _trust_root(relay.tls_ca_file) if needs_roots else None
    tls_policy = {k: TLSPolicy(v, trust if v == "verify" else None) for k, v in policies.items()}
    # Loops: an MX named like us, or one whose address and port reach one of
    # our SMTP listeners (another port on this machine is another server).
    listening = [(host, port) for kind, host, port in
                 (parse_address(lc.address) for lc in config.listeners if lc.protocol == "smtp")
                 if kind != "unix"]
    resolver = make_resolver(relay.nameservers, reactor)
    remote = RemoteDelivery(resolver, deliver_to_host,
                            helo=helo, reactor=reactor, tls_policy=tls_policy,
                            own_names=(config.server.hostname, helo),
                            own_endpoint=OwnListeners(listening), dns_timeout=(2, 5),
                            security=build_security(relay, reactor, resolver, q.directory))
    auth = None
    if relay.smarthost_username:
        auth = (relay.smarthost_username, relay.smarthost_password)
    # Queued local recipients may forward outside: their copies go back into
    # the queue through the outbox (set below, once the manager exists).
    local = LocalTarget(directory, delivery, srs=srs, clock=reactor, signer=signer)
    router = Router(directory.is_local_domain, local, remote,
                    relay.transports, relay.smarthost or None, connect=deliver_to_host,
                    helo=helo, reactor=reactor, tls_policy=tls_policy, smarthost_auth=auth,
                    relay_domains=_relay_next_hops(config))
    spool = QueueSpool(q.directory, clock=reactor.seconds, fsync=config.store.fsync)
    def io(f, *args):  # spool work (fsync included) never on the reactor thread
        return threads.deferToThreadPool(reactor, pool, f, *args)

    manager = QueueManager(spool, router, reactor, hostname=config.server.hostname, io=io,
                           schedule=Schedule(
                               min_backoff=q.min_backoff, max_backoff=q.max_backoff,
                               lifetime=q.lifetime, delay_warning=q.delay_warning,
                               scan_interval=q.scan_interval, max_active=q.max_active,
                               destination_concurrency=q.destination_concurrency),
                           metrics=metrics, postmaster=_postmaster(config))
    manager.setServiceParent(parent)
    local.outbox = Outbox(spool, pool, reactor, wake=manager.wake)
    return local.outbox


def _postmaster(config: Config):
    """Where notices of undeliverable bounces go: postmaster@<first local
    domain>, or None (logged only) when turned off or there is no local domain."""
    if not config.queue.notify_postmaster or not config.domains.local:
        return None
    return f"postmaster@{config.domains.local[0]}"


def _relay_next_hops(config: Config) -> dict:
    """The corporate relay domains' next hops (checked when the file loaded)."""
    from mailserver.delivery.relaydomains import config_next_hops

    return config_next_hops(config)


def build_service(config: Config, reactor=None, identity=None,
                  twistd_options=None, *, channel=None, adopted=None) -> MailService:
    """The server for ``config``.  ``identity``
    (:class:`~mailserver.privileges.Identity`): the user twistd switches to
    after binding, who gets every directory and file made here;
    ``twistd_options`` (its --logfile, -n) say where [log] lines go by default.

    With ``[server] workers`` above 1 this is the supervisor (see
    :mod:`mailserver.workers`).  A worker passes its ``channel``
    (:class:`~mailserver.workers.channel.WorkerChannel`) and ``adopted``
    (listener name -> (file descriptor, address family)) instead."""
    if reactor is None:
        from twisted.internet import reactor
    if channel is not None:
        role = "worker"
    else:
        role = "supervisor" if worker_count(config) > 1 else "single"
    from mailserver.privileges import prepare

    notes = []
    tls = None
    # Directories before anything opens them, owned by the service user.
    # Reading the spool (leftover scratch files, queue recovery) waits for
    # startService, which runs as that user.
    files = prepare(config, identity)
    if config.tls.certificate:
        if config.tls.self_signed and not os.path.exists(config.tls.certificate):
            make_self_signed(config.tls.certificate, config.tls.private_key, config.server.hostname)
            files.give((config.tls.certificate, config.tls.private_key))
            notes.append(f"created self-signed certificate {config.tls.certificate}")
        tls = ReloadableTLS(config.tls.certificate, config.tls.private_key, sni=config.tls.sni)
    top = MailService(config, tls, role)
    top.notes = notes
    from mailserver.logs import build_observer

    # A worker sets up its own observer before this (workers.worker).
    top.log_observer = build_observer(config.log, twistd_options) if role != "worker" else None
    top.identity = identity

    pool = ThreadPool(minthreads=1, maxthreads=config.server.io_threads, name="mailserver-io")
    ThreadPoolService(pool).setServiceParent(top)
    metrics = build_metrics(config, reactor, top, channel)
    directory = build_directory(config, reactor, top, metrics)
    store = MaildirStore(config.store.maildir_root, template=config.store.template,
                         hostname=config.server.hostname, fsync=config.store.fsync)
    delivery = LocalDelivery(store, pool, reactor)
    if role != "worker":
        # Abandoned tmp/ files (a crash mid-delivery): a few maildirs per tick.
        from mailserver.store.tmpclean import TmpCleaner

        TmpCleaner(store.root, reactor,
                   lambda f, *args: threads.deferToThreadPool(reactor, pool, f, *args)
                   ).setServiceParent(top)
    srs = None
    if config.relay.srs_secret:
        from mailserver.srs import SRS

        srs = SRS(config.relay.srs_secret,
                  config.relay.srs_domain or (config.domains.local + config.domains.relay)[0],
                  max_age_days=config.relay.srs_max_age, clock=reactor.seconds)
    from mailserver.msgauth.dkim_sign import signer_from_config

    signer = signer_from_config(
        config, lambda f, *a, **kw: threads.deferToThreadPool(reactor, pool, f, *a, **kw), reactor)
    if role == "worker":  # the supervisor runs the queue; we wake it
        from mailserver.workers.worker import worker_outbox

        outbox = worker_outbox(config, reactor, pool, channel)
    else:
        outbox = build_queue(config, reactor, top, directory, delivery, pool, srs, metrics,
                             signer)
    if role == "supervisor":
        from mailserver.workers.supervisor import WorkerPool

        top.workers = WorkerPool(config, reactor, worker_count(config), top,
                                 build_login_throttle(config, reactor),
                                 build_rate_limiter(config, reactor), metrics)
        top.workers.setServiceParent(top)
        return top
    parts = Parts(
        config=config, reactor=reactor, directory=directory, local=delivery,
        delivery=RecipientDelivery(delivery, outbox, srs, reactor, signer), outbox=outbox,
        srs=srs, signer=signer,
        trusted=Networks(config.relay.trusted_networks),
        authenticator=build_authenticator(config, directory, reactor, metrics,
                                          channel.login_throttle if channel else None),
        rate_limiter=channel.rate_limiter if channel else build_rate_limiter(config, reactor),
        tls=tls, store=store,
        io=lambda f, *args: threads.deferToThreadPool(reactor, pool, f, *args),
        metrics=metrics, channel=channel)
    from mailserver.msgauth.inbound import build_inbound_auth

    parts.inbound_auth = build_inbound_auth(config, reactor, top, parts.trusted)
    for lc in config.listeners:
        if adopted is not None:
            from mailserver.workers.worker import AdoptedEndpoint

            endpoint = AdoptedEndpoint(reactor, *adopted[lc.name])
        else:
            endpoint = make_endpoint(reactor, lc.address, lc.socket_mode)
        svc = ListenerService(endpoint, build_listener(parts, lc),
                              config.server.shutdown_grace, reactor)
        svc.setName(lc.name)
        svc.setServiceParent(top)
    return top


def build_authenticator(config: Config, directory, reactor, metrics=None, throttle=None):
    """SMTP AUTH and POP3 through the directory's twisted.cred checker,
    slowed by one failed-login throttle shared by every listener (in a
    worker, ``throttle`` asks the supervisor's)."""
    from mailserver.directory.cred import DirectoryChecker
    from mailserver.pipeline.auth import Authenticator

    if throttle is None:
        throttle = build_login_throttle(config, reactor)
    return Authenticator(DirectoryChecker(directory), throttle, directory, reactor, metrics)


def build_login_throttle(config: Config, reactor):
    from mailserver.throttle import LoginThrottle

    a = config.auth
    return LoginThrottle(reactor, base_delay=a.failure_delay, max_delay=a.max_failure_delay,
                         max_failures=a.max_failures, window=a.failure_window)


def build_rate_limiter(config: Config, reactor):
    from mailserver.throttle import RateLimiter, RateLimits

    s = config.submission
    return RateLimiter(reactor, RateLimits(
        messages_per_hour=s.messages_per_hour, messages_per_day=s.messages_per_day,
        recipients_per_hour=s.recipients_per_hour, recipients_per_day=s.recipients_per_day),
        exempt=frozenset(x.lower() for x in s.rate_limit_exempt))


# -- metrics ([metrics]) --------------------------------------------------------
def build_metrics(config: Config, reactor, parent: MailService, channel=None):
    """The Prometheus endpoint when ``[metrics] address`` is set (a twisted.web
    site on its own listening service), and the Metrics object the parts count
    into; None when metrics are off.  A worker serves none: it counts into
    the supervisor's (see :mod:`mailserver.workers.metrics`)."""
    if not config.metrics.address:
        return None
    if channel is not None:
        from mailserver.workers.metrics import worker_metrics

        return worker_metrics(config, reactor, parent, channel)
    from mailserver.metrics import Metrics, build_metrics_site

    metrics = Metrics(queue_dir=config.queue.directory)
    endpoint = make_endpoint(reactor, config.metrics.address)
    svc = StreamServerEndpointService(endpoint, build_metrics_site(metrics))
    svc._raiseSynchronously = True
    svc.setName("metrics")
    svc.setServiceParent(parent)
    parent.notes.append(f"metrics on http://{config.metrics.address}/metrics")
    return metrics
