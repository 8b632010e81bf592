"""Starting the real process: bad configurations, the quick start, the packaging."""

from __future__ import annotations

import shutil
import smtplib
import socket
import subprocess
import sys
import os
from pathlib import Path

import pytest

from tests.support.server import REPO, TWISTD, free_port, twistd_env, wait_for_port

pytestmark = pytest.mark.slow

GOOD = """
[server]
allow_root = true
[domains]
local = ["example.test"]
[directory]
ldif_file = "{ldif}"
[[listeners]]
address = "127.0.0.1:{port}"
"""


def run_twistd(config: Path, cwd: Path, timeout=30):
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "mailserver", "--config", str(config)],
        cwd=cwd, env=twistd_env(), capture_output=True, text=True, timeout=timeout,
    )


def ctl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mailserver.ctl", *args], cwd=cwd,
                          env=twistd_env(), capture_output=True, text=True, timeout=60)


BAD = [
    ("[smtp]\nmax_recipients = \"ten\"\n", "smtp.max_recipients: expected an integer"),
    ("[smtp]\nmax_recipientz = 1\n", "smtp.max_recipientz: unknown key"),
    ("[tls]\ncertificate = \"missing.pem\"\nprivate_key = \"missing.pem\"\n",
     "tls.certificate: "),
    ("[tls]\ncertificate = \"garbage.pem\"\nprivate_key = \"garbage.pem\"\n",
     "tls.certificate: "),
]


@pytest.mark.parametrize("extra, expected", BAD, ids=["type", "unknown", "missing-cert", "bad-cert"])
def test_bad_config_exits_before_binding(tmp_path, extra, expected):
    """A bad config exits non-zero with one line naming file and key, and binds nothing."""
    (tmp_path / "garbage.pem").write_text("not a certificate")
    port = free_port()
    cfg = tmp_path / "bad.toml"
    cfg.write_text(GOOD.format(ldif=REPO / "etc/quickstart-users.ldif", port=port) + extra)
    out = run_twistd(cfg, tmp_path)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[0].startswith(f"mailserver: {cfg}: {expected}"), out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # still free
    checked = ctl("check-config", str(cfg), cwd=tmp_path)
    assert checked.returncode == 1
    assert f"{cfg}: {expected}" in checked.stderr


def test_missing_config_file(tmp_path):
    """A missing config file is one clear line and a non-zero exit."""
    out = run_twistd(tmp_path / "absent.toml", tmp_path)
    assert out.returncode != 0
    assert out.stderr.strip() == f"mailserver: {tmp_path / 'absent.toml'}: file not found"


def test_port_in_use(tmp_path):
    """A listener whose port is taken stops the server with one line and a non-zero exit."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(GOOD.format(ldif=REPO / "etc/quickstart-users.ldif", port=port))
        out = run_twistd(cfg, tmp_path)
    assert out.returncode != 0
    assert f"mailserver: {cfg}: cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_check_config_accepts_good_file(tmp_path):
    """mailserverctl check-config says ok for a valid file."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(GOOD.format(ldif=REPO / "etc/quickstart-users.ldif", port=2525))
    out = ctl("check-config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_quickstart_config_runs(tmp_path, client_tls):
    """The quick-start config starts, makes its self-signed certificate, and takes mail."""
    shutil.copytree(REPO / "etc", tmp_path / "etc")
    smtp_port, lmtp_port = free_port(), free_port()
    cfg = tmp_path / "etc" / "quickstart.toml"
    cfg.write_text(cfg.read_text().replace("127.0.0.1:2525", f"127.0.0.1:{smtp_port}")
                   .replace("127.0.0.1:2424", f"127.0.0.1:{lmtp_port}"))
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "mailserver", "--config", "etc/quickstart.toml"],
        cwd=tmp_path, env=twistd_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        import time

        wait_for_port(smtp_port, time.monotonic() + 30, proc)
        assert (tmp_path / "var/tls/cert.pem").exists()
        ctx = client_tls.__class__(client_tls.protocol)
        ctx.check_hostname = False
        ctx.verify_mode = 0  # self-signed: the quick start cannot be verified
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
            s.starttls(context=ctx)
            s.sendmail("x@example.org", ["alice@example.test"], b"Subject: qs\r\n\r\nhi\r\n")
        new = tmp_path / "var/mail/example.test/alice/new"
        assert len(list(new.iterdir())) == 1
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out  # SIGTERM is a graceful stop: exit 0
    assert "Server Shut Down." in out
    assert "created self-signed certificate" in out


def test_wheel_installs_plugin(tmp_path):
    """A built wheel (not an editable install) gives `twistd mailserver` and mailserverctl."""
    pytest.importorskip("build")
    src = tmp_path / "src"  # build from a copy: the build writes into its source tree
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "var", "build",
                                                             "*.egg-info", "__pycache__"))
    out = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                          "--outdir", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    [wheel] = (tmp_path / "dist").glob("mailserver-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # A real install, dependencies included, as an administrator would do it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(venv / "bin/pip"), "install", "-q", str(wheel)], check=True,
                   timeout=300, env=env)
    help_out = subprocess.run([str(venv / "bin/twistd"), "--help"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert "mailserver" in help_out.stdout, help_out.stdout + help_out.stderr
    ctl_out = subprocess.run([str(venv / "bin/mailserverctl"), "--help"], capture_output=True,
                             text=True, cwd=tmp_path, env=env, timeout=60)
    assert "check-config" in ctl_out.stdout
    checked = subprocess.run([str(venv / "bin/mailserverctl"), "check-config", "etc/quickstart.toml"],
                             capture_output=True, text=True, cwd=src, env=env, timeout=60)
    assert checked.returncode == 0, checked.stderr
