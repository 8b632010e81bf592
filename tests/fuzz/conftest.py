"""Hypothesis settings for the fuzz targets.

CI runs each target briefly (``FUZZ_EXAMPLES_DEFAULT`` examples); set
``MAILSERVER_FUZZ_EXAMPLES`` for a long run, e.g.
``MAILSERVER_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest tests/fuzz``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES_DEFAULT = 150

EXAMPLES = int(os.environ.get("MAILSERVER_FUZZ_EXAMPLES", FUZZ_EXAMPLES_DEFAULT))

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
"""Decorate every fuzz target with this."""
