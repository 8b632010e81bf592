"""``mailserverctl queue``: commands run through argparse against a real spool."""

from __future__ import annotations

import argparse
import json
import os
import time

import pytest

from mailserver.config import SECTIONS
from mailserver.queue.cli import add_queue_commands, queue_dir_from_args
from mailserver.queue.envelope import ClientInfo, Envelope, Recipient
from mailserver.queue.spool import ACTIVE, CORRUPT, DEFERRED, HOLD, INCOMING, QueueSpool
from mailserver.reply import Reply

CONTENT = (b"Received: from c.example by mx.example.org\r\nSubject: Hello\r\n"
           b"From: alice@example.org\r\n\r\nsecret body\r\n")


def parser():
    p = argparse.ArgumentParser(prog="mailserverctl")
    sub = p.add_subparsers(dest="command", required=True)
    add_queue_commands(sub)
    return p


@pytest.fixture
def qdir(tmp_path):
    return str(tmp_path / "queue")


@pytest.fixture
def spool(qdir):
    return QueueSpool(qdir)


def run(qdir, *argv):
    args = parser().parse_args(["queue", *argv, "--queue-dir", qdir])
    return args.func(args)


def add(spool, state=INCOMING, rcpts=("bob@example.net",), sender="alice@example.org",
        reply=None):
    recipients = [Recipient(a) for a in rcpts]
    if reply is not None:
        recipients[0].record(reply, "mx.example.net[192.0.2.1]", time.time())
    with spool.begin() as w:
        w.write(CONTENT)
        qid = w.commit(Envelope(id="", sender=sender, recipients=recipients,
                                arrival=time.time() - 7200, last_error="",
                                client=ClientInfo(address="192.0.2.9", helo="c.example")))
    if state != INCOMING:
        spool.move(qid, state)
    return qid


def test_list_empty(qdir, spool, capsys):
    assert run(qdir, "list") == 0
    assert "Mail queue is empty" in capsys.readouterr().out
    assert run(qdir, "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_list_like_mailq(qdir, spool, capsys):
    a = add(spool, DEFERRED, reply=Reply(451, (4, 3, 0), "greylisted"))
    b = add(spool, HOLD, rcpts=("x@example.com", "y@example.com"), sender="")
    assert run(qdir, "list") == 0
    out = capsys.readouterr().out
    assert a in out and b in out
    assert "deferred" in out and "hold" in out
    assert "alice@example.org" in out and "MAILER-DAEMON" in out
    assert "(451 4.3.0 greylisted (from mx.example.net[192.0.2.1]))" in out
    assert "x@example.com" in out and "y@example.com" in out
    assert " 2h " in out
    assert "in 2 Requests." in out


def test_list_json_and_state_filter(qdir, spool, capsys):
    a = add(spool, DEFERRED, reply=Reply(451, (4, 3, 0), "greylisted"))
    add(spool, INCOMING)
    assert run(qdir, "list", "--json", "--state", "deferred") == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["id"] == a and entry["state"] == "deferred"
    assert entry["size"] == len(CONTENT) and entry["sender"] == "alice@example.org"
    assert entry["age"] == "2h"
    assert entry["recipients"][0]["last_reply"].startswith("451 4.3.0 greylisted")


def test_list_shows_corrupt_messages(qdir, spool, capsys):
    qid = add(spool)
    spool.quarantine(qid, "bad envelope")
    assert run(qdir, "list") == 0
    out = capsys.readouterr().out
    assert qid in out and "corrupt" in out and "bad envelope" in out
    run(qdir, "list", "--json")
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["state"] == CORRUPT and "bad envelope" in entry["reason"]


def test_show(qdir, spool, capsys):
    qid = add(spool, DEFERRED, reply=Reply(451, (4, 3, 0), "greylisted"))
    assert run(qdir, "show", qid) == 0
    out = capsys.readouterr().out
    assert f"id: {qid}" in out and "state: deferred" in out
    assert "sender: <alice@example.org>" in out
    assert "<bob@example.net> pending, 1 attempt(s)" in out
    assert "Subject: Hello" in out
    assert "secret body" not in out
    assert run(qdir, "show", qid, "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "deferred" and shown["envelope"]["id"] == qid


def test_show_marks_a_mailbox_only_retry(qdir, spool, capsys):
    qid = add(spool, rcpts=("carol@example.test",))
    _state, env = spool.load(qid)
    env.recipients[0].mailbox_only = True
    spool.save(qid, env)
    assert run(qdir, "show", qid) == 0
    assert "<carol@example.test> pending, 0 attempt(s) [mailbox-only]" in capsys.readouterr().out


def test_show_unknown_and_corrupt(qdir, spool, capsys):
    assert run(qdir, "show", "NOSUCH") == 1
    assert "not in the queue" in capsys.readouterr().err
    assert run(qdir, "show", "../../etc/passwd") == 1
    assert "invalid queue id" in capsys.readouterr().err
    qid = add(spool)
    with open(spool.envelope_path(INCOMING, qid), "wb") as f:
        f.write(b"garbage")
    spool.quarantine(qid, "garbage found")
    assert run(qdir, "show", qid) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and "garbage found" in out and "Subject: Hello" in out


def test_flush_ids_domain_and_all(qdir, spool, capsys):
    net = add(spool, DEFERRED, rcpts=("a@example.net",))
    com = add(spool, DEFERRED, rcpts=("b@example.com",))
    org = add(spool, DEFERRED, rcpts=("c@example.org",))
    held = add(spool, HOLD)
    assert run(qdir, "flush", "--domain", "example.net") == 0
    assert spool.find(net) == INCOMING and spool.find(com) == DEFERRED
    assert os.path.exists(spool.flush_path)
    os.utime(spool.flush_path, (0, 0))
    assert run(qdir, "flush", com) == 0
    assert spool.find(com) == INCOMING
    assert os.stat(spool.flush_path).st_mtime > 0, "trigger touched"
    assert run(qdir, "flush", com) == 0  # already due: nothing to do
    assert run(qdir, "flush", held) == 1
    assert f"{held}: cannot flush a message in hold/" in capsys.readouterr().err
    assert run(qdir, "flush") == 0
    assert spool.find(org) == INCOMING and spool.find(held) == HOLD
    assert "1 deferred message(s) moved" in capsys.readouterr().out


def test_hold_and_release(qdir, spool, capsys):
    a, b = add(spool), add(spool, DEFERRED)
    assert run(qdir, "hold", a, b) == 0
    assert spool.find(a) == HOLD and spool.find(b) == HOLD
    assert f"{a}: held" in capsys.readouterr().out
    assert run(qdir, "release", a, b) == 0
    assert spool.find(a) == INCOMING and spool.find(b) == INCOMING
    assert run(qdir, "release", a) == 1
    assert "cannot" in capsys.readouterr().err


def test_hold_and_delete_refuse_an_active_message(qdir, spool, capsys):
    qid = add(spool)
    spool.move(qid, ACTIVE)  # the manager is delivering it
    assert run(qdir, "hold", qid) == 1
    assert "being delivered right now" in capsys.readouterr().err
    assert run(qdir, "delete", qid) == 1
    assert "being delivered right now" in capsys.readouterr().err
    assert spool.find(qid) == ACTIVE
    assert os.path.exists(spool.content_path(qid))


def test_delete(qdir, spool, capsys):
    a, b, c = add(spool, HOLD), add(spool, DEFERRED), add(spool)
    assert run(qdir, "delete", a, c, "MISSING") == 1
    captured = capsys.readouterr()
    assert f"{a}: deleted" in captured.out and f"{c}: deleted" in captured.out
    assert "MISSING: not in the queue" in captured.err
    assert [i for _, i in spool.list()] == [b]
    assert not os.path.exists(spool.content_path(a))


def test_delete_all_deferred(qdir, spool, capsys):
    d1, d2 = add(spool, DEFERRED), add(spool, DEFERRED)
    keep = add(spool, HOLD)
    assert run(qdir, "delete", "--all-deferred") == 0
    out = capsys.readouterr().out
    assert f"{d1}: deleted" in out and f"{d2}: deleted" in out and "2 deferred" in out
    assert [i for _, i in spool.list()] == [keep]
    assert run(qdir, "delete") == 1
    assert run(qdir, "delete", keep, "--all-deferred") == 1


def test_missing_queue_directory_is_exit_78(tmp_path, capsys):
    assert run(str(tmp_path / "nope"), "list") == 78
    assert "not a queue directory" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


MINIMAL = """
[server]
base_dir = "{base}"
[domains]
local = ["example.test"]
[directory]
ldif_file = "users.ldif"
[[listeners]]
address = "127.0.0.1:2525"
"""


def test_queue_dir_from_config(tmp_path, monkeypatch):
    (tmp_path / "users.ldif").write_text("")
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL.format(base=tmp_path))
    args = parser().parse_args(["queue", "list", "--config", str(cfg)])
    assert queue_dir_from_args(args) == str(tmp_path / "var/queue")
    if "queue" in SECTIONS:  # the [queue] section of the configuration
        cfg.write_text(MINIMAL.format(base=tmp_path) + '[queue]\ndirectory = "q"\n')
        assert queue_dir_from_args(args) == str(tmp_path / "q")
    args = parser().parse_args(["queue", "list", "--config", str(cfg), "--queue-dir", "/x/y"])
    assert queue_dir_from_args(args) == "/x/y"


def test_bad_config_is_exit_78(tmp_path, capsys):
    args = parser().parse_args(["queue", "list", "--config", str(tmp_path / "absent.toml")])
    assert args.func(args) == 78
    assert "file not found" in capsys.readouterr().err


def test_default_config_path():
    args = parser().parse_args(["queue", "list"])
    assert args.config == "/etc/mailserver/mailserver.toml" and args.queue_dir is None
