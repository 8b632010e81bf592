"""The outbound queue's envelope format and on-disk spool, on a real filesystem."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading

import pytest

from mailserver.queue.envelope import ClientInfo, Envelope, EnvelopeError, Recipient
from mailserver.queue.spool import (
    ACTIVE, CORRUPT, DEFERRED, HOLD, INCOMING, ORPHAN_AGE, STATES,
    AlreadyClaimed, InvalidQueueId, NotQueued, QueueError, QueueSpool,
)
from mailserver.reply import Reply
from mailserver.incoming import IncomingMessage, new_queue_id, prepare_spool

CONTENT = b"Received: from c.example\r\nSubject: hi\r\n\r\nbody\r\n"
NOW = 1_700_000_000.0


def envelope(**kw) -> Envelope:
    values = dict(
        id="", sender="alice@example.org",
        recipients=[Recipient("bob@example.net", notify=("FAILURE", "DELAY"),
                              orcpt="rfc822;bob@example.net"),
                    Recipient("carol@example.com")],
        arrival=NOW, client=ClientInfo(address="192.0.2.9", helo="c.example",
                                       protocol="ESMTP"),
    )
    values.update(kw)
    return Envelope(**values)


@pytest.fixture
def spool(tmp_path):
    return QueueSpool(str(tmp_path / "q"), clock=lambda: NOW)


def queue(spool, content=CONTENT, **kw) -> str:
    with spool.begin() as w:
        w.write(content)
        return w.commit(envelope(**kw))


def files(spool):
    """Every file under the spool root, relative, sorted."""
    out = []
    for dirpath, _dirs, names in os.walk(spool.root):
        for n in names:
            out.append(os.path.relpath(os.path.join(dirpath, n), spool.root))
    return sorted(out)


# --- envelope ----------------------------------------------------------------

def test_envelope_round_trip():
    env = envelope(id="ABC123", eight_bit=True, smtputf8=True, envid="QQ+2B1", ret="HDRS",
                   attempts=2, next_attempt=NOW + 300, last_error="451 4.3.0 later")
    env.recipients[0].record(Reply(451, (4, 4, 1), "timeout\nsecond line"),
                             "mx.example.net[192.0.2.1]", NOW + 5)
    env.recipients[1].record(Reply(250, (2, 0, 0), "ok"), "mx.example.com[192.0.2.2]", NOW)
    data = env.to_json()
    assert data.endswith(b"\n") and data.isascii()
    again = Envelope.from_json(data)
    assert again == env
    assert again.recipients[0].state == "pending"
    assert again.recipients[0].attempts == 1
    assert again.recipients[1].state == "delivered"
    assert json.loads(data)["version"] == 1


def test_envelope_mailbox_only_flag():
    """A mailbox retry keeps its flag; envelopes written before the flag
    existed read as False."""
    env = envelope(id="ABC123")
    env.recipients[0].mailbox_only = True
    again = Envelope.from_json(env.to_json())
    assert again.recipients[0].mailbox_only and again.recipients[0].outbound().mailbox_only
    assert not again.recipients[1].mailbox_only
    raw = json.loads(env.to_json())
    assert "mailbox_only" not in raw["recipients"][1]  # written only when set
    del raw["recipients"][0]["mailbox_only"]
    assert not Envelope.from_json(json.dumps(raw).encode()).recipients[0].mailbox_only


def test_envelope_keeps_non_ascii_addresses():
    env = envelope(id="X1", sender="jörg@exämple.org",
                   recipients=[Recipient("名前@example.jp")])
    assert Envelope.from_json(env.to_json()).recipients[0].address == "名前@example.jp"


def test_record_sets_state_by_reply_class():
    r = Recipient("a@b.example")
    r.record(Reply(451, (4, 3, 0), "later"), "mx[192.0.2.1]", NOW)
    assert r.state == "pending" and r.attempts == 1 and r.last_attempt == NOW
    r.record(Reply(550, (5, 1, 1), "unknown"), "mx[192.0.2.1]", NOW + 1)
    assert r.state == "bounced" and r.attempts == 2


def test_outbound_request_has_pending_recipients_only():
    env = envelope(id="X1", envid="E1", ret="FULL", size=10)
    env.recipients[1].state = "delivered"
    msg = env.outbound("/q/data/X1")
    assert msg.queue_id == "X1" and msg.content_path == "/q/data/X1"
    assert [r.address for r in msg.recipients] == ["bob@example.net"]
    assert msg.recipients[0].notify == ("FAILURE", "DELAY")
    assert msg.recipients[0].orcpt == "rfc822;bob@example.net"
    assert (msg.envid, msg.ret, msg.size) == ("E1", "FULL", 10)
    assert env.pending() == env.recipients[:1] and not env.done


def _valid() -> dict:
    return envelope(id="ABC").to_dict()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("sender"), "sender: missing"),
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d.update(version=2), "unsupported envelope version"),
    (lambda d: d.update(version="1"), "expected int"),
    (lambda d: d.update(size=True), "expected int"),
    (lambda d: d.update(eight_bit=1), "expected bool"),
    (lambda d: d.update(recipients=[]), "no recipients"),
    (lambda d: d["recipients"][0].update(state="lost"), "invalid recipient state"),
    (lambda d: d["recipients"][0].update(notify=["NEVER", "FAILURE"]), "invalid NOTIFY"),
    (lambda d: d["recipients"][0].update(notify=["SOMETIMES"]), "invalid NOTIFY"),
    (lambda d: d["recipients"][0].update(last_reply=[451, "5.0.0", "x"]), "last_reply"),
    (lambda d: d["recipients"][0].update(last_reply=[451, "4.0.0"]), "last_reply"),
    (lambda d: d["recipients"][0].pop("orcpt"), "orcpt: missing"),
    (lambda d: d["client"].update(helo=None), "client.helo"),
    (lambda d: d.update(ret="SOME"), "invalid RET"),
    (lambda d: d.update(id="../etc"), "invalid queue id"),
    (lambda d: d.update(attempts=-1), "negative"),
])
def test_envelope_validation_is_strict(mutate, message):
    d = _valid()
    mutate(d)
    with pytest.raises(EnvelopeError, match=message):
        Envelope.from_json(json.dumps(d).encode())


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"\xff\xfe", b'{"version": NaN}',
                                  json.dumps(_valid()).replace('"arrival": 1700000000.0',
                                                               '"arrival": Infinity').encode()])
def test_envelope_garbage_is_an_envelope_error(data):
    with pytest.raises(EnvelopeError):
        Envelope.from_json(data)


# --- writing ------------------------------------------------------------------

def test_commit_makes_content_and_envelope(spool):
    qid = queue(spool)
    assert sorted(files(spool)) == [f"data/{qid}", f"incoming/{qid}"]
    assert list(spool.list()) == [(INCOMING, qid)]
    with open(spool.content_path(qid), "rb") as f:
        assert f.read() == CONTENT
    state, env = spool.load(qid)
    assert state == INCOMING and env.id == qid and env.size == len(CONTENT)
    for path in (spool.content_path(qid), spool.envelope_path(INCOMING, qid)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    for d in ("data", "tmp", *STATES):
        assert stat.S_IMODE(os.stat(os.path.join(spool.root, d)).st_mode) == 0o700


def test_content_streams_into_a_tmp_file(spool):
    w = spool.begin()
    w.write(b"part one\r\n")
    assert files(spool) == [f"data/{w.queue_id}.tmp"]
    assert list(spool.list()) == []
    w.write(b"part two\r\n")
    w.commit(envelope())
    with open(spool.content_path(w.queue_id), "rb") as f:
        assert f.read() == b"part one\r\npart two\r\n"


def test_abort_and_context_manager_remove_everything(spool):
    w = spool.begin()
    w.write(CONTENT)
    w.abort()
    w.abort()
    with spool.begin() as w2:
        w2.write(CONTENT)
    assert files(spool) == []
    with pytest.raises(ValueError):
        w.write(b"x")


def test_commit_refuses_an_invalid_envelope_and_cleans_up(spool):
    w = spool.begin()
    w.write(CONTENT)
    with pytest.raises(EnvelopeError):
        w.commit(envelope(recipients=[]))
    assert files(spool) == []


def test_ids_are_sortable_and_unique(spool):
    ids = [queue(spool) for _ in range(20)]
    assert len(set(ids)) == 20
    assert [i for _, i in spool.list()] == sorted(ids)


class Failing:
    """Wrap an os function to raise at its n-th call (0-based)."""

    def __init__(self, real, n, exc=None):
        self.real, self.n, self.calls = real, n, 0
        self.exc = exc or OSError(errno.EIO, "simulated I/O error")

    def __call__(self, *args, **kw):
        i = self.calls
        self.calls += 1
        if i == self.n:
            raise self.exc
        return self.real(*args, **kw)


@pytest.mark.parametrize("name", ["fsync", "rename", "write", "open"])
def test_commit_failing_at_every_step_leaves_nothing(spool, monkeypatch, name):
    """Crash simulation: whichever call fails, nothing is left that looks
    committed, and once no call fails the commit goes through."""
    real = getattr(os, name)
    for n in range(20):
        w = spool.begin()  # os.open of the content file is not counted
        w.write(CONTENT)
        failing = Failing(real, n)
        monkeypatch.setattr(os, name, failing)
        try:
            qid = w.commit(envelope())
        except OSError as e:
            assert e.errno == errno.EIO
            monkeypatch.setattr(os, name, real)
            assert files(spool) == [], (name, n)
            assert list(spool.list()) == []
            continue
        finally:
            monkeypatch.setattr(os, name, real)
        assert failing.calls <= n, "committed although a call failed"
        assert n == {"fsync": 4, "rename": 2, "write": 1, "open": 3}[name]
        assert spool.load(qid)[0] == INCOMING
        break
    else:
        pytest.fail(f"commit never succeeded with os.{name} failing")


def test_fsync_is_called_for_file_and_directories(spool, monkeypatch):
    calls = []
    real = os.fsync

    def spy(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    qid = queue(spool)
    # content, data/, the envelope (under tmp/), incoming/ - in this order
    assert calls[0].endswith(f"data/{qid}.tmp")
    assert calls[1] == spool.data_dir
    assert "/tmp/" in calls[2]
    assert calls[3] == spool.state_dir(INCOMING)


def test_claim_between_envelope_rename_and_dir_fsync_keeps_the_message(tmp_path, monkeypatch):
    """If the incoming/ fsync fails after a manager already claimed the
    envelope, the message stays queued (a duplicate at worst, never a loss)."""
    root = str(tmp_path / "q")
    spool, manager = QueueSpool(root), QueueSpool(root)
    incoming = spool.state_dir(INCOMING)
    real = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == incoming:
            for _, qid in manager.list(INCOMING):
                manager.move(qid, ACTIVE)
            raise OSError(errno.EIO, "simulated")
        return real(fd)

    w = spool.begin()
    w.write(CONTENT)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        w.commit(envelope())
    monkeypatch.setattr(os, "fsync", real)
    assert list(spool.list()) == [(ACTIVE, w.queue_id)]
    assert os.path.exists(spool.content_path(w.queue_id))


def test_fsync_false_skips_fsync(tmp_path, monkeypatch):
    spool = QueueSpool(str(tmp_path / "q"), fsync=False)
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync called"))
    qid = queue(spool)
    spool.move(qid, ACTIVE)


# --- enqueue_path -------------------------------------------------------------

def test_enqueue_path_links_the_scratch_file(spool, tmp_path):
    scratch = str(tmp_path / "scratch")
    prepare_spool(scratch)
    qid = new_queue_id()
    msg = IncomingMessage(scratch, qid)
    msg.write(CONTENT)
    msg.finish()
    env = envelope(id=qid)
    assert spool.enqueue_path(msg.path, env) == qid
    assert env.size == len(CONTENT)
    msg.discard()  # the listener removes its scratch name as usual
    with open(spool.content_path(qid), "rb") as f:
        assert f.read() == CONTENT
    assert spool.load(qid)[1].size == len(CONTENT)


@pytest.mark.parametrize("err", [errno.EPERM, errno.EXDEV])
def test_enqueue_path_without_hard_links(spool, tmp_path, monkeypatch, err):
    src = tmp_path / "m"
    src.write_bytes(CONTENT)

    def no_link(a, b):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "link", no_link)
    qid = spool.enqueue_path(str(src), envelope())
    with open(spool.content_path(qid), "rb") as f:
        assert f.read() == CONTENT
    assert src.exists() == (err == errno.EXDEV)  # copied, or renamed
    assert files(spool) == [f"data/{qid}", f"incoming/{qid}"]


def test_enqueue_path_failure_leaves_nothing(spool, tmp_path, monkeypatch):
    src = tmp_path / "m"
    src.write_bytes(CONTENT)
    monkeypatch.setattr(os, "rename", Failing(os.rename, 0))
    with pytest.raises(OSError):
        spool.enqueue_path(str(src), envelope())
    assert files(spool) == [] and src.exists()


# --- reading and changing state -------------------------------------------------

def test_invalid_ids_never_become_paths(spool):
    for bad in ("../x", "a/b", "", ".", "x.tmp", "A" * 65, "ü"):
        with pytest.raises(InvalidQueueId):
            spool.content_path(bad)
        with pytest.raises(InvalidQueueId):
            spool.move(bad, HOLD)
    with pytest.raises(InvalidQueueId):
        spool.begin("../../etc")


def test_load_missing_and_not_queued(spool):
    with pytest.raises(NotQueued):
        spool.load("NOSUCHID")
    assert spool.find("NOSUCHID") is None


def test_load_checks_the_id_inside(spool):
    qid = queue(spool)
    other = queue(spool)
    os.replace(spool.envelope_path(INCOMING, other), spool.envelope_path(INCOMING, qid))
    with pytest.raises(EnvelopeError, match="envelope says id"):
        spool.load(qid)


def test_move_through_states(spool):
    qid = queue(spool)
    assert spool.move(qid, ACTIVE) == INCOMING
    assert spool.move(qid, DEFERRED, from_states=(ACTIVE,)) == ACTIVE
    assert spool.move(qid, ACTIVE) == DEFERRED
    assert spool.move(qid, DEFERRED) == ACTIVE
    assert spool.move(qid, HOLD, from_states=(INCOMING, DEFERRED)) == DEFERRED
    with pytest.raises(AlreadyClaimed) as e:
        spool.move(qid, ACTIVE)  # not from hold/
    assert e.value.state == HOLD
    assert spool.move(qid, INCOMING, from_states=(HOLD,)) == HOLD
    assert list(spool.list()) == [(INCOMING, qid)]
    assert list(spool.list(DEFERRED)) == []


def test_save_rewrites_in_place(spool):
    qid = queue(spool)
    spool.move(qid, ACTIVE)
    state, env = spool.load(qid)
    env.recipients[0].record(Reply(451, (4, 3, 0), "later"), "mx[192.0.2.1]", NOW)
    env.attempts, env.next_attempt = 1, NOW + 300
    assert spool.save(qid, env) == ACTIVE
    assert spool.load(qid) == (ACTIVE, env)
    assert not os.listdir(spool.tmp_dir)
    with pytest.raises(ValueError):
        spool.save("OTHER", env)


def test_save_of_a_vanished_message_writes_nothing(spool):
    qid = queue(spool)
    _, env = spool.load(qid)
    spool.delete(qid)
    with pytest.raises(NotQueued):
        spool.save(qid, env)
    with pytest.raises(NotQueued):
        spool.save(qid, env, INCOMING)
    assert files(spool) == []


def test_delete_removes_envelope_then_content(spool, monkeypatch):
    qid = queue(spool)
    order = []
    real = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p: (order.append(p), real(p))[1])
    assert spool.delete(qid) == INCOMING
    assert order[:2] == [spool.envelope_path(INCOMING, qid), spool.content_path(qid)]
    assert files(spool) == []
    with pytest.raises(AlreadyClaimed) as e:
        spool.delete(qid)
    assert e.value.state is None


def test_delete_limited_to_states(spool):
    qid = queue(spool)
    spool.move(qid, ACTIVE)
    with pytest.raises(AlreadyClaimed) as e:
        spool.delete(qid, states=(INCOMING, DEFERRED, HOLD))
    assert e.value.state == ACTIVE
    assert spool.find(qid) == ACTIVE


# --- several processes ----------------------------------------------------------

def test_two_spools_racing_for_one_message(tmp_path):
    root = str(tmp_path / "q")
    a, b = QueueSpool(root), QueueSpool(root)
    qid = queue(a)
    assert a.move(qid, ACTIVE) == INCOMING
    with pytest.raises(AlreadyClaimed) as e:
        b.move(qid, ACTIVE)
    assert e.value.state == ACTIVE and e.value.queue_id == qid
    a.delete(qid)
    with pytest.raises(AlreadyClaimed) as e:
        b.move(qid, ACTIVE)
    assert e.value.state is None


def test_claims_race_every_message_claimed_exactly_once(tmp_path):
    root = str(tmp_path / "q")
    writer = QueueSpool(root, fsync=False)
    ids = [queue(writer) for _ in range(200)]
    for qid in ids[::2]:
        writer.move(qid, DEFERRED)
    claimed = {0: [], 1: [], 2: []}
    start = threading.Barrier(3)

    def worker(n):
        spool = QueueSpool(root, fsync=False)
        start.wait()
        for qid in ids:
            try:
                spool.move(qid, ACTIVE)
            except AlreadyClaimed:
                continue
            claimed[n].append(qid)

    threads = [threading.Thread(target=worker, args=(n,)) for n in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = claimed[0] + claimed[1] + claimed[2]
    assert sorted(everything) == sorted(ids)
    assert [s for s, _ in writer.list()] == [ACTIVE] * 200


# --- quarantine and recovery ------------------------------------------------------

def test_quarantine_moves_and_records_the_reason(spool):
    qid = queue(spool)
    spool.move(qid, DEFERRED)
    assert spool.quarantine(qid, "bad things")
    assert list(spool.list()) == [(CORRUPT, qid)]
    assert spool.reason(qid).endswith("bad things")
    assert os.path.exists(spool.corrupt_content_path(qid))  # never deleted, moved along
    with pytest.raises(EnvelopeError):
        spool.load(qid)
    spool.delete(qid, states=(CORRUPT,))
    assert files(spool) == []


def test_quarantine_without_envelope_writes_a_stub(spool):
    qid = queue(spool)
    os.unlink(spool.envelope_path(INCOMING, qid))
    assert spool.quarantine(qid, "envelope lost")
    assert list(spool.list()) == [(CORRUPT, qid)]
    assert os.path.exists(spool.corrupt_content_path(qid))
    assert not spool.quarantine("GONE", "nothing there")
    assert list(spool.list()) == [(CORRUPT, qid)]


def test_quarantine_moves_the_data_file_with_the_envelope(spool):
    """A quarantined message's content leaves data/ for corrupt/ with its envelope, whatever the cause."""
    by_call = queue(spool)
    spool.move(by_call, HOLD)
    spool.quarantine(by_call, "manager could not read it")
    garbage = queue(spool)
    with open(spool.envelope_path(INCOMING, garbage), "wb") as f:
        f.write(b"{not json")
    spool.recover()
    for qid in (by_call, garbage):
        assert not os.path.exists(spool.content_path(qid))
        with open(spool.corrupt_content_path(qid), "rb") as f:
            assert f.read() == CONTENT
    assert os.listdir(spool.data_dir) == []
    assert sorted(i for _, i in spool.list()) == sorted([by_call, garbage])  # .data not listed
    spool.delete(by_call, states=(CORRUPT,))
    assert not os.path.exists(spool.corrupt_content_path(by_call))


def test_recover_moves_content_left_behind_by_older_quarantines(spool):
    """Content of a corrupt/ envelope still in data/ (older spools, a crash mid-quarantine) is moved on recovery."""
    qid = queue(spool)
    os.rename(spool.envelope_path(INCOMING, qid), spool.envelope_path(CORRUPT, qid))
    spool.recover()
    assert os.listdir(spool.data_dir) == []
    assert os.path.exists(spool.corrupt_content_path(qid))


def _age(path, seconds):
    t = NOW - seconds
    os.utime(path, (t, t))


def test_recover(spool):
    """Every case at once: active back to incoming, leftovers removed, recent
    orphans kept, broken envelopes quarantined, good ones untouched."""
    good = queue(spool)
    spool.move(good, DEFERRED)
    crashed = queue(spool)
    spool.move(crashed, ACTIVE)
    garbage = queue(spool)
    with open(spool.envelope_path(INCOMING, garbage), "wb") as f:
        f.write(b'{"version": 1, "id": "trunc')
    lost_data = queue(spool)
    spool.move(lost_data, HOLD)
    os.unlink(spool.content_path(lost_data))
    w = spool.begin()  # half-written content: a client mid-DATA at the crash
    w.write(b"partial")
    with open(os.path.join(spool.tmp_dir, "X.1.2"), "wb") as f:
        f.write(b"half an envelope")
    old_orphan, new_orphan = new_queue_id(), new_queue_id()
    for qid, age in ((old_orphan, ORPHAN_AGE + 10), (new_orphan, 60)):
        path = spool.content_path(qid)
        with open(path, "wb") as f:
            f.write(CONTENT)
        _age(path, age)
    already_corrupt = queue(spool)
    spool.quarantine(already_corrupt, "earlier")
    _age(spool.corrupt_content_path(already_corrupt), ORPHAN_AGE * 10)

    report = spool.recover()

    assert report.requeued == 1
    assert report.tmp_removed == 2
    assert report.orphans_removed == 1
    assert report.quarantined == 2
    assert bool(report) and "requeued=1" in str(report)
    states = dict((i, s) for s, i in spool.list())
    assert states == {good: DEFERRED, crashed: INCOMING, garbage: CORRUPT,
                      lost_data: CORRUPT, already_corrupt: CORRUPT}
    assert "unreadable envelope in incoming/" in spool.reason(garbage)
    assert "data file missing" in spool.reason(lost_data)
    assert os.path.exists(spool.corrupt_content_path(garbage))
    assert os.path.exists(spool.content_path(new_orphan))
    assert not os.path.exists(spool.content_path(old_orphan))
    assert os.path.exists(spool.corrupt_content_path(already_corrupt))
    assert os.listdir(spool.tmp_dir) == []
    assert spool.load(crashed)[1].id == crashed
    assert not spool.recover()  # nothing left to do


def test_recover_quarantines_an_unreadable_file(spool):
    qid = queue(spool)
    path = spool.envelope_path(INCOMING, qid)
    os.unlink(path)
    os.mkdir(path)  # open() fails with an OSError, even for root
    assert spool.recover().quarantined == 1
    assert spool.find(qid) == CORRUPT


def test_flush_by_domain_and_trigger_file(spool):
    net = queue(spool, recipients=[Recipient("x@Example.NET")])
    com = queue(spool, recipients=[Recipient("y@example.com")])
    done = queue(spool, recipients=[Recipient("z@example.net", state="delivered"),
                                    Recipient("w@example.org")])
    for qid in (net, com, done):
        spool.move(qid, DEFERRED)
    assert not os.path.exists(spool.flush_path)
    assert spool.flush(domain="example.net.") == [net]
    assert os.path.exists(spool.flush_path)
    assert sorted(spool.flush()) == sorted([com, done])
    assert {s for s, _ in spool.list()} == {INCOMING}


def test_create_false_refuses_a_missing_queue(tmp_path):
    with pytest.raises(QueueError, match="not a queue directory"):
        QueueSpool(str(tmp_path / "nothing"), create=False)
    assert not (tmp_path / "nothing").exists()

