"""The crash-injection hook (mailserver.faults)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mailserver import faults
from tests.support.server import REPO

SCRIPT = "from mailserver.faults import crash_point\ncrash_point('queue.data')\n" \
         "crash_point('maildir.linked')\nprint('survived')\n"


def _run(env_value):
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    env["PYTHONPATH"] = str(REPO)
    if env_value is not None:
        env[faults.ENV] = env_value
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True)


def test_unset_is_a_no_op():
    """Without MAILSERVER_CRASH_AT every crash point does nothing."""
    done = _run(None)
    assert done.returncode == 0 and done.stdout == b"survived\n"


@pytest.mark.parametrize("step", ["queue.data", "maildir.linked"])
def test_the_named_step_exits_137_at_once(step):
    """The named step ends the process with 137 and one line saying where."""
    done = _run(step)
    assert done.returncode == faults.EXIT_CODE
    assert done.stdout == b""
    assert done.stderr == f"mailserver: crash injected at {step}\n".encode()


def test_another_step_passes():
    """A step other than the named one passes."""
    assert _run("queue.removed").stdout == b"survived\n"


def test_every_step_is_placed_in_the_code():
    """Every documented step has its crash_point call in the sources."""
    sources = "".join(p.read_text() for p in (REPO / "mailserver").rglob("*.py"))
    for step in faults.STEPS:
        kind, _, what = step.partition(".")
        assert (f'crash_point("{step}")' in sources
                or (kind == "queue" and 'crash_point(f"queue.{to_state}")' in sources
                    and what in ("active", "deferred"))), step
