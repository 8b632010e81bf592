# -*- test-case-name: tests.unit.test_queue_cli -*-
"""``mailserverctl queue``: look at and steer the outbound queue.

::

    mailserverctl queue list [--json] [--state S]     like mailq / postqueue -p
    mailserverctl queue show ID [--json]              envelope and content header
    mailserverctl queue flush [ID... | --domain D]    deferred -> incoming, now
    mailserverctl queue hold ID...                    incoming/deferred -> hold
    mailserverctl queue release ID...                 hold -> incoming
    mailserverctl queue delete ID... | --all-deferred

Every command takes ``--config FILE`` (the queue directory is the config's
``[queue] directory``) or ``--queue-dir DIR``.

Safe while the server runs: the commands only rename or unlink envelope
files, with the same rename claims the queue manager uses (see
:mod:`mailserver.queue.spool`), and never rewrite one.  A message in
``active/`` is being delivered right now: ``hold`` and ``delete`` refuse it
with a message saying so (exit status 1), and the administrator repeats the
command once the attempt is over (a few seconds; the message is then in
``deferred/`` or gone).  Nothing is queued up for later, so no request can
surprise anyone hours afterwards.

``flush`` moves messages to ``incoming/``, where everything is due at once,
and touches ``<queue>/flush``; the running manager picks them up on its next
scan of ``incoming/``, or at once if it watches that file's mtime.

Exit status: 0 done, 1 some message was not found or was busy, 78 the
configuration or queue directory is unusable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

from mailserver.errors import ConfigError
from mailserver.queue.envelope import Envelope, EnvelopeError
from mailserver.queue.spool import (
    ACTIVE, CORRUPT, DEFERRED, HOLD, INCOMING, STATES,
    AlreadyClaimed, InvalidQueueId, NotQueued, QueueError, QueueSpool,
)

__all__ = ["add_queue_commands", "queue_dir_from_args", "DEFAULT_CONFIG", "DEFAULT_QUEUE_DIR"]

DEFAULT_CONFIG = "/etc/mailserver/mailserver.toml"
DEFAULT_QUEUE_DIR = "var/queue"
EX_OK, EX_FAILED, EX_CONFIG = 0, 1, 78

_HEADER_SHOWN = 64 * 1024  # ``show`` prints at most this much of the header


def queue_dir_from_args(args) -> str:
    """The queue directory: ``--queue-dir``, else the config's ``[queue] directory``.

    A config without a ``[queue]`` section gives ``var/queue`` under the
    server's base directory.  Raises ConfigError for an unusable config.
    """
    if getattr(args, "queue_dir", None):
        return os.path.abspath(args.queue_dir)
    from mailserver.config import load_config

    config = load_config(args.config, check_files=False)
    queue = getattr(config, "queue", None)
    directory = getattr(queue, "directory", None)
    if directory:
        return os.path.abspath(directory)
    base = getattr(config.server, "base_dir", "") or os.getcwd()
    return os.path.abspath(os.path.join(base, DEFAULT_QUEUE_DIR))


def _out(args):
    return sys.stdout


def _err(args, message: str) -> None:
    print(f"mailserverctl: {message}", file=sys.stderr)


def _run(action):
    """Wrap a command: open the spool, map config/queue errors to exit 78."""
    def run(args) -> int:
        try:
            spool = QueueSpool(queue_dir_from_args(args), create=False)
        except (ConfigError, QueueError) as e:
            _err(args, str(e))
            return EX_CONFIG
        try:
            return action(args, spool)
        except OSError as e:  # permissions, a vanished directory
            _err(args, f"{e.filename or spool.root}: {e.strerror}")
            return EX_FAILED
    return run


# --- list / show ------------------------------------------------------------

def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _reply_text(rcpt) -> str:
    if rcpt.last_reply is None:
        return ""
    r = rcpt.last_reply
    enh = "%d.%d.%d " % r.enhanced if r.enhanced else ""
    text = f"{r.code} {enh}{' '.join(r.text.split())}"
    return f"{text} (from {rcpt.remote})" if rcpt.remote else text


def _entry(spool: QueueSpool, state: str, queue_id: str, now: float) -> Optional[dict]:
    """One message as a dict for ``list``; None when it vanished meanwhile."""
    try:
        env = spool.read_envelope(state, queue_id)
    except FileNotFoundError:
        return None
    except (OSError, EnvelopeError) as e:
        return {"id": queue_id, "state": state, "error": str(e),
                "reason": spool.reason(queue_id) if state == CORRUPT else ""}
    entry = {
        "id": queue_id,
        "state": state,
        "size": env.size,
        "arrival": env.arrival,
        "age": _age(now - env.arrival),
        "sender": env.sender,
        "attempts": env.attempts,
        "next_attempt": env.next_attempt,
        "last_error": env.last_error,
        "recipients": [
            {"address": r.address, "state": r.state, "attempts": r.attempts,
             "last_reply": _reply_text(r), "remote": r.remote}
            for r in env.recipients
        ],
    }
    if state == CORRUPT:
        entry["reason"] = spool.reason(queue_id)
    return entry


def cmd_list(args, spool: QueueSpool) -> int:
    now = time.time()
    entries = []
    for state, queue_id in spool.list(args.state):
        entry = _entry(spool, state, queue_id, now)
        if entry is not None:
            entries.append(entry)
    out = _out(args)
    if args.json:
        json.dump(entries, out, indent=2)
        out.write("\n")
        return EX_OK
    if not entries:
        print("Mail queue is empty", file=out)
        return EX_OK
    print(f"{'-Queue ID-':<18} {'-State-':<9} {'--Size--':>8} {'----Arrival Time----':<20} "
          f"{'Age':>5}  -Sender/Recipient-------", file=out)
    total = 0
    for e in entries:
        if "error" in e:
            print(f"{e['id']:<18} {e['state']:<9} {'?':>8} {'':<20} {'':>5}  "
                  f"(unreadable: {e['reason'] or e['error']})", file=out)
            continue
        total += e["size"]
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(e["arrival"]))
        print(f"{e['id']:<18} {e['state']:<9} {e['size']:>8} {arrival:<20} {e['age']:>5}  "
              f"{e['sender'] or 'MAILER-DAEMON'}", file=out)
        for r in e["recipients"]:
            if r["last_reply"] and r["state"] == "pending":
                print(f"{'':<66}({r['last_reply']})", file=out)
            mark = "" if r["state"] == "pending" else f"  [{r['state']}]"
            print(f"{'':<66}{r['address']}{mark}", file=out)
        if e["last_error"]:
            print(f"{'':<66}(last error: {e['last_error']})", file=out)
        if e.get("reason"):
            print(f"{'':<66}(quarantined: {e['reason']})", file=out)
    print(f"-- {(total + 1023) // 1024} Kbytes in {len(entries)} "
          f"Request{'s' if len(entries) != 1 else ''}.", file=out)
    return EX_OK


def _read_header(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(_HEADER_SHOWN)
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = data.find(sep)
        if end >= 0:
            return data[:end]
    return data


def cmd_show(args, spool: QueueSpool) -> int:
    out = _out(args)
    try:
        state, env = spool.load(args.id)
    except (NotQueued, InvalidQueueId) as e:
        _err(args, str(e))
        return EX_FAILED
    except (OSError, EnvelopeError) as e:
        state = spool.find(args.id) or CORRUPT
        print(f"id: {args.id}\nstate: {state}\nenvelope: unreadable ({e})", file=out)
        reason = spool.reason(args.id)
        if reason:
            print(f"quarantined: {reason}", file=out)
        env = None
    if env is not None:
        if args.json:
            json.dump({"state": state, "envelope": env.to_dict()}, out, indent=2)
            out.write("\n")
            return EX_OK
        _print_envelope(state, env, out)
    try:
        content = spool.content_path(args.id)
        if state == CORRUPT and not os.path.lexists(content):
            content = spool.corrupt_content_path(args.id)  # moved along when quarantined
        header = _read_header(content)
    except FileNotFoundError:
        print("content: missing", file=out)
        return EX_OK if env is not None else EX_FAILED
    print("", file=out)
    print(header.decode("utf-8", "replace").replace("\r\n", "\n"), file=out)
    return EX_OK


def _print_envelope(state: str, env: Envelope, out) -> None:
    fmt = "%Y-%m-%d %H:%M:%S %z"
    print(f"id: {env.id}", file=out)
    print(f"state: {state}", file=out)
    print(f"sender: <{env.sender}>", file=out)
    print(f"arrival: {time.strftime(fmt, time.localtime(env.arrival))}", file=out)
    print(f"size: {env.size}", file=out)
    print(f"attempts: {env.attempts}", file=out)
    if env.next_attempt:
        print(f"next attempt: {time.strftime(fmt, time.localtime(env.next_attempt))}"
              + (" (due now: in incoming/)" if state == INCOMING else ""), file=out)
    flags = [f for f, on in (("8BITMIME", env.eight_bit), ("SMTPUTF8", env.smtputf8)) if on]
    if flags:
        print(f"flags: {' '.join(flags)}", file=out)
    if env.envid or env.ret:
        print(f"dsn: envid={env.envid or '-'} ret={env.ret or '-'}", file=out)
    c = env.client
    if c.address or c.helo:
        print(f"client: {c.hostname or 'unknown'}[{c.address}] helo={c.helo} "
              f"protocol={c.protocol}" + (f" login={c.login}" if c.login else ""), file=out)
    if env.last_error:
        print(f"last error: {env.last_error}", file=out)
    print("recipients:", file=out)
    for r in env.recipients:
        extra = []
        if r.notify:
            extra.append("notify=" + ",".join(r.notify))
        if r.orcpt:
            extra.append(f"orcpt={r.orcpt}")
        if r.mailbox_only:
            extra.append("mailbox-only")  # a local copy retried; its forwards already left
        print(f"  <{r.address}> {r.state}, {r.attempts} attempt(s)"
              + (f" [{' '.join(extra)}]" if extra else ""), file=out)
        if r.last_reply is not None:
            print(f"    {_reply_text(r)}", file=out)


# --- flush / hold / release / delete -----------------------------------------------

def _each(args, spool, ids: List[str], verb: str, done: str, act) -> int:
    """Run ``act(id)`` for each id; report results; exit 1 if any failed."""
    status = EX_OK
    for queue_id in ids:
        try:
            act(queue_id)
        except InvalidQueueId as e:
            _err(args, str(e))
            status = EX_FAILED
        except AlreadyClaimed as e:
            status = EX_FAILED
            if e.state is None:
                _err(args, f"{queue_id}: not in the queue")
            elif e.state == ACTIVE:
                _err(args, f"{queue_id}: being delivered right now (in active/); "
                           f"try again when the attempt is over")
            else:
                _err(args, f"{queue_id}: cannot {verb} a message in {e.state}/")
        else:
            print(f"{queue_id}: {done}", file=_out(args))
    return status


def cmd_flush(args, spool: QueueSpool) -> int:
    if args.ids and args.domain:
        _err(args, "give message ids or --domain, not both")
        return EX_FAILED
    if args.ids:
        def flush_one(queue_id):
            try:
                spool.move(queue_id, INCOMING, from_states=(DEFERRED,))
            except AlreadyClaimed as e:
                if e.state != INCOMING:  # in incoming/ it is due already
                    raise

        status = _each(args, spool, args.ids, "flush", "flushed", flush_one)
        spool.touch_flush()
        return status
    moved = spool.flush(domain=args.domain)
    for queue_id in moved:
        print(f"{queue_id}: flushed", file=_out(args))
    what = f" for {args.domain}" if args.domain else ""
    print(f"{len(moved)} deferred message(s){what} moved to incoming", file=_out(args))
    return EX_OK


def cmd_hold(args, spool: QueueSpool) -> int:
    return _each(args, spool, args.ids, "hold", "held",
                 lambda i: spool.move(i, HOLD, from_states=(INCOMING, DEFERRED)))


def cmd_release(args, spool: QueueSpool) -> int:
    return _each(args, spool, args.ids, "release", "released",
                 lambda i: spool.move(i, INCOMING, from_states=(HOLD,)))


def cmd_delete(args, spool: QueueSpool) -> int:
    if bool(args.ids) == bool(args.all_deferred):
        _err(args, "give message ids or --all-deferred")
        return EX_FAILED
    if args.all_deferred:
        deleted = 0
        for _, queue_id in list(spool.list(DEFERRED)):
            try:
                spool.delete(queue_id, states=(DEFERRED,))
            except AlreadyClaimed:
                continue  # claimed for delivery or flushed meanwhile
            print(f"{queue_id}: deleted", file=_out(args))
            deleted += 1
        print(f"{deleted} deferred message(s) deleted", file=_out(args))
        return EX_OK
    return _each(args, spool, args.ids, "delete", "deleted",
                 lambda i: spool.delete(i, states=(INCOMING, DEFERRED, HOLD, CORRUPT)))


# --- argparse ---------------------------------------------------------------

def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG,
                   help=f"configuration file (default: {DEFAULT_CONFIG}); "
                        f"its [queue] directory is used")
    p.add_argument("--queue-dir", metavar="DIR", help="queue directory (overrides --config)")
    return p


def add_queue_commands(subparsers) -> argparse.ArgumentParser:
    """Add ``queue`` and its sub-commands to ``mailserverctl``'s subparsers.

    Each command sets ``func``: ``args.func(args)`` returns the exit status.
    """
    common = _common()
    queue = subparsers.add_parser("queue", help="list and steer the outbound queue",
                                  description=__doc__.split("\n")[0])
    sub = queue.add_subparsers(dest="queue_command", required=True)

    p = sub.add_parser("list", parents=[common], help="list queued messages (like mailq)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--state", choices=STATES, help="only messages in this state")
    p.set_defaults(func=_run(cmd_list))

    p = sub.add_parser("show", parents=[common], help="show a message's envelope and header")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="the envelope as JSON")
    p.set_defaults(func=_run(cmd_show))

    p = sub.add_parser("flush", parents=[common],
                       help="retry deferred messages now (all, some, or one domain's)")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--domain", help="only messages with a pending recipient in this domain")
    p.set_defaults(func=_run(cmd_flush))

    p = sub.add_parser("hold", parents=[common], help="put messages on hold")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=_run(cmd_hold))

    p = sub.add_parser("release", parents=[common], help="release held messages")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=_run(cmd_release))

    p = sub.add_parser("delete", parents=[common],
                       help="delete messages (no questions asked)")
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all-deferred", action="store_true", help="every deferred message")
    p.set_defaults(func=_run(cmd_delete))
    return queue
