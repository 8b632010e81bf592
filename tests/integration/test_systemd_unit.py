"""The shipped systemd unit: what it promises, and systemd-analyze's opinion of it."""

from __future__ import annotations

import configparser
import shutil
import subprocess

import pytest

from tests.support.server import REPO, TWISTD

pytestmark = pytest.mark.slow

UNIT = REPO / "etc" / "systemd" / "mailserver.service"


def _service_section() -> dict:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return dict(parser["Service"])


def test_unit_declares_readiness_reload_and_hardening():
    """The unit waits for READY=1, reloads with SIGHUP, restarts on failure and is sandboxed."""
    s = _service_section()
    assert s["Type"] == "notify"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["Restart"] == "on-failure"
    assert s["User"] == "mailserver"
    assert s["CapabilityBoundingSet"] == s["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes"
    assert s["ReadWritePaths"].split() == ["/var/lib/mailserver", "/var/spool/mailserver"]
    assert s["PrivateTmp"] == "yes" and s["ProtectHome"] == "yes"
    assert "--pidfile= mailserver --config /etc/mailserver/mailserver.toml" in s["ExecStart"]
    assert int(s["TimeoutStopSec"].rstrip("s")) > 30  # above the default shutdown_grace


def test_systemd_analyze_verify_is_clean(tmp_path):
    """systemd-analyze verify finds nothing wrong (with ExecStart pointed at this twistd)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "mailserver.service"
    unit.write_text(UNIT.read_text().replace("/opt/mailserver/bin/twistd", TWISTD))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr
