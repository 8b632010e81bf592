"""Fixtures shared by the test suite.

``tls_files``: a trustme CA and a server certificate for mx.example.test.
``server``: one real ``twistd -n mailserver`` on the embedded LDIF directory
(``etc/quickstart-users.ldif``) with STARTTLS, shared by a test module.
"""

from __future__ import annotations

import ssl

import pytest

from tests.support.server import REPO, MailServer

QUICKSTART_LDIF = str(REPO / "etc" / "quickstart-users.ldif")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("mx.example.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    return {"certificate": str(d / "server.pem"), "private_key": str(d / "server.pem"),
            "ca": str(d / "ca.pem")}


@pytest.fixture(scope="session")
def client_tls(tls_files):
    ctx = ssl.create_default_context(cafile=tls_files["ca"])
    ctx.check_hostname = False  # tests connect to 127.0.0.1
    return ctx


def embedded_directory() -> dict:
    return {"backend": "ldif", "ldif_file": QUICKSTART_LDIF, "base_dn": "dc=example,dc=test"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tls_files):
    srv = MailServer(
        tmp_path_factory.mktemp("server"),
        directory=embedded_directory(),
        tls={"certificate": tls_files["certificate"], "private_key": tls_files["private_key"]},
        smtp={"max_message_size": 200000, "max_recipients": 5, "max_errors": 6},
    )
    srv.start()
    yield srv
    srv.stop()
