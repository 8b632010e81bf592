"""mailserverctl status and log, on made-up inputs (the real server is in
tests/integration/test_observe.py)."""

from __future__ import annotations

import datetime
import socket

import pytest

from mailserver.observe_cli import (
    CRITICAL, OK, WARNING, Check, check_certificate, follow, overall, probe,
)

TEXT_LOG = """\
2026-12-03T10:00:00+0000 [mailserver.smtpd#info] smtp: connect from 127.0.0.1
2026-12-03T10:00:00+0000 [mailserver.smtpd#info] AAAAAAAAAAAAAAAA: client=127.0.0.1, from=<b@example.test>, size=10, nrcpt=2
2026-12-03T10:00:00+0000 [mailserver.delivery#info] AAAAAAAAAAAAAAAA: queued from=<b@example.test> for 1 recipient(s) as BBBBBBBBBBBBBBBB
2026-12-03T10:00:01+0000 [mailserver.smtpd#info] CCCCCCCCCCCCCCCC: client=127.0.0.1, from=<c@example.test>, size=10, nrcpt=1
2026-12-03T10:00:02+0000 [mailserver.qmgr#info] BBBBBBBBBBBBBBBB: to=<x@example.org>, relay=none, status=bounced (550 5.1.1 no)
2026-12-03T10:00:02+0000 [mailserver.qmgr#info] BBBBBBBBBBBBBBBB: sender failure notification: DDDDDDDDDDDDDDDD
2026-12-03T10:00:03+0000 [mailserver.qmgr#info] DDDDDDDDDDDDDDDD: to=<b@example.test>, relay=local, status=sent (250 ok)
2026-12-03T10:00:03+0000 [mailserver.qmgr#info] CCCCCCCCCCCCCCCC: removed
"""


def test_follow_takes_spawned_messages_along():
    """Forwarded copies and reports named 'as ID' or 'notification: ID' are followed."""
    out = list(follow(TEXT_LOG.splitlines(True), "AAAAAAAAAAAAAAAA"))
    assert len(out) == 5
    assert not any("CCCC" in line for line in out)
    assert "DDDDDDDDDDDDDDDD: to=<b@example.test>" in out[-1]


def test_follow_matches_whole_ids_only():
    """An id is not found inside a longer word."""
    assert list(follow(["XAAAAAAAAAAAAAAAAX: nothing\n"], "AAAAAAAAAAAAAAAA")) == []


@pytest.mark.parametrize("days, state", [(90, OK), (10, WARNING), (-1, CRITICAL)])
def test_certificate_expiry_thresholds(tmp_path, days, state):
    """Over 14 days left is ok, fewer a warning, expired critical."""
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("mx.example.test")
    path = tmp_path / "cert.pem"
    cert.cert_chain_pems[0].write_to_path(str(path))
    from cryptography import x509

    expires = x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc
    now = (expires - datetime.timedelta(days=days, hours=1)).timestamp()
    assert check_certificate(str(path), now=now).state == state


def test_unreadable_certificate_is_a_warning(tmp_path):
    """A certificate that cannot be read is reported, not a crash."""
    assert check_certificate(str(tmp_path / "missing.pem")).state == WARNING


def test_overall_is_the_worst_state():
    """One critical check makes the whole report critical; unknown counts as ok."""
    checks = [Check("a", "1", OK, ""), Check("b", "2", "unknown", "")]
    assert overall(checks) == OK
    assert overall(checks + [Check("c", "3", WARNING, "")]) == WARNING
    assert overall(checks + [Check("c", "3", WARNING, ""), Check("d", "4", CRITICAL, "")]) \
        == CRITICAL


def test_probe_reports_refusal_and_success(tmp_path):
    """A listening UNIX socket connects; a missing one does not."""
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(path)
        s.listen()
        assert probe(f"unix:{path}")[0] is True
    assert probe(f"unix:{tmp_path / 'none.sock'}")[0] is False


def _config(tmp_path, extra: str = "") -> str:
    (tmp_path / "users.ldif").write_text("")
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\nbase_dir = "{tmp_path}"\n[domains]\nlocal = ["example.test"]\n'
                    '[directory]\nldif_file = "users.ldif"\n' + extra +
                    '[[listeners]]\naddress = "127.0.0.1:1"\n')
    return str(path)


def test_log_without_a_file_says_how_to_name_one(tmp_path, capsys):
    """With no [log] file and no --file, the command explains and exits 78."""
    from mailserver.ctl import main

    assert main(["log", "AAAAAAAAAAAAAAAA", "-c", _config(tmp_path)]) == 78
    assert "--file" in capsys.readouterr().err


def test_log_reads_the_configured_file(tmp_path, capsys):
    """Without --file, [log] file is read."""
    from mailserver.ctl import main

    (tmp_path / "mail.log").write_text(TEXT_LOG)
    path = _config(tmp_path, '[log]\nfile = "mail.log"\n')
    assert main(["log", "CCCCCCCCCCCCCCCC", "-c", path]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_status_with_a_broken_config_is_critical(tmp_path, capsys):
    """A configuration that does not load is critical (exit 2)."""
    from mailserver.ctl import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[smtp]\nmax_recipients = 'ten'\n")
    assert main(["status", "-c", str(bad)]) == 2
    assert "bad.toml" in capsys.readouterr().err
