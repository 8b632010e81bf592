# -*- test-case-name: tests.unit.test_faults -*-
"""Fault injection for the crash-matrix tests: die at a named step.

:func:`crash_point` marks a step of a durable write (a maildir delivery, a
queue transition).  When the environment variable ``MAILSERVER_CRASH_AT``
names that step at start-up, the process writes one line to stderr and ends
with ``os._exit(137)`` there, like a SIGKILL: no cleanup, no flush, no
``finally``.  Without the variable ``crash_point`` is a function that does
nothing, chosen once at import, so production pays one call.

The steps (see ``tests/integration/test_crash_matrix.py``):

``maildir.tmp_written``  the message is in ``tmp/``, not yet fsynced
``maildir.fsynced``      fsynced, not yet linked into ``new/``
``maildir.linked``       linked into ``new/``, the tmp name still there
``maildir.dir_fsynced``  ``new/`` fsynced; the 250 not yet sent
``queue.data``           content durable in ``data/``, no envelope yet
``queue.incoming``       envelope renamed into ``incoming/``; no 250 yet
``queue.active``         envelope claimed (renamed into ``active/``)
``queue.deferred``       envelope renamed into ``deferred/`` after a failure
``queue.removed``        delivered; envelope unlinked, content not yet
"""

from __future__ import annotations

import os

ENV = "MAILSERVER_CRASH_AT"
EXIT_CODE = 137

STEPS = (
    "maildir.tmp_written", "maildir.fsynced", "maildir.linked", "maildir.dir_fsynced",
    "queue.data", "queue.incoming", "queue.active", "queue.deferred", "queue.removed",
)


def _armed(target: str):
    def crash_point(name: str) -> None:
        """Die here, at once, when ``name`` is the step ``MAILSERVER_CRASH_AT`` names."""
        if name == target:
            os.write(2, f"mailserver: crash injected at {name}\n".encode())
            os._exit(EXIT_CODE)

    return crash_point


def _disarmed(name: str) -> None:
    """No crash injection configured: nothing to do."""


_target = os.environ.get(ENV)
crash_point = _armed(_target) if _target else _disarmed
