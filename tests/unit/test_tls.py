"""Server TLS: certificates, SNI, reload, protocol versions and ciphers.

Handshakes run in memory: a pyOpenSSL client connection and a server
connection from ``ReloadableTLS.serverConnectionForTLS`` exchange bytes
through their memory BIOs, or, for the Twisted path, two
``TLSMemoryBIOProtocol`` instances talk through ``twisted.test.iosim``.
"""

from __future__ import annotations

import os

import pytest
from cryptography import x509
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import protocol, ssl, task
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim

from mailserver.tls import (
    DEFAULT_CIPHERS,
    ReloadableTLS,
    load_certificate,
    load_pem_bundle,
    make_self_signed,
)

trustme = pytest.importorskip("trustme")


# -- helpers ------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca():
    return trustme.CA(key_type=trustme.KeyType.RSA)


def write_cert(ca, path, *names, key_type=None) -> str:
    """Issue a certificate for ``names`` and write key and chain to ``path``."""
    kw = {"key_type": key_type} if key_type is not None else {}
    ca.issue_cert(*names, **kw).private_key_and_cert_chain_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def files(ca, tmp_path):
    """Default certificate (RSA) for mx.example.test and an SNI bundle for
    submission.example.org and a wildcard one for *.example.net."""
    return {
        "default": write_cert(ca, tmp_path / "default.pem", "mx.example.test",
                              key_type=trustme.KeyType.RSA),
        "org": write_cert(ca, tmp_path / "org.pem", "submission.example.org"),
        "net": write_cert(ca, tmp_path / "net.pem", "*.example.net"),
    }


@pytest.fixture
def tls(files):
    return ReloadableTLS(files["default"], files["default"],
                         sni={"submission.example.org": files["org"], "*.example.net": files["net"]})


def client(server_name=None, min_version=SSL.TLS1_2_VERSION, max_version=None, ciphers=None):
    """A pyOpenSSL client connection on memory BIOs (no verification)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if ciphers is not None:
        ctx.set_cipher_list(ciphers)
    ctx.set_min_proto_version(min_version)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    conn = SSL.Connection(ctx, None)
    if server_name is not None:
        conn.set_tlsext_host_name(server_name)
    conn.set_connect_state()
    return conn


def pump(a: SSL.Connection, b: SSL.Connection) -> None:
    """Move pending TLS records between the two connections until quiet."""
    moved = True
    while moved:
        moved = False
        for src, dst in ((a, b), (b, a)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            if data:
                dst.bio_write(data)
                moved = True


def handshake(tls: ReloadableTLS, cli: SSL.Connection):
    """Run a handshake; return (server connection, client error, server error)."""
    srv = tls.serverConnectionForTLS(None)
    srv.set_accept_state()
    errors = {"client": None, "server": None}
    done = {"client": False, "server": False}
    grace = 2  # rounds after a failure, for the alert to reach the other side
    for _ in range(20):
        for name, conn in (("client", cli), ("server", srv)):
            if done[name] or errors[name]:
                continue
            try:
                conn.do_handshake()
                done[name] = True
            except SSL.WantReadError:
                pass
            except SSL.Error as e:
                errors[name] = e
        pump(cli, srv)
        if any(errors.values()):
            grace -= 1
        if all(done.values()) or grace < 0:
            break
    if not any(errors.values()):
        assert all(done.values()), "handshake did not finish"
    return srv, errors["client"], errors["server"]


def names_seen(cli: SSL.Connection) -> list:
    """DNS names of the certificate the client received."""
    cert = cli.get_peer_certificate().to_cryptography()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


def exchange(cli: SSL.Connection, srv: SSL.Connection, payload: bytes) -> None:
    """Send payload both ways over an established connection."""
    cli.sendall(payload)
    pump(cli, srv)
    assert srv.recv(65536) == payload
    srv.sendall(payload[::-1])
    pump(cli, srv)
    assert cli.recv(65536) == payload[::-1]


# -- certificate choice (SNI) -------------------------------------------------

def test_no_sni_gets_default_certificate(tls):
    """A client that sends no server name receives the default certificate."""
    cli = client()
    _srv, cerr, serr = handshake(tls, cli)
    assert (cerr, serr) == (None, None)
    assert names_seen(cli) == ["mx.example.test"]


def test_sni_picks_matching_certificate(tls):
    """A server name in the SNI table selects that bundle's certificate."""
    cli = client(b"submission.example.org")
    srv, cerr, serr = handshake(tls, cli)
    assert (cerr, serr) == (None, None)
    assert names_seen(cli) == ["submission.example.org"]
    exchange(cli, srv, b"EHLO client.example\r\n")


def test_sni_name_is_case_insensitive(tls):
    """The client's server name is compared without regard to case."""
    cli = client(b"Submission.EXAMPLE.org")
    handshake(tls, cli)
    assert names_seen(cli) == ["submission.example.org"]


@pytest.mark.parametrize("name, expected", [
    (b"smtp.example.net", "*.example.net"),
    (b"imap.example.net", "*.example.net"),
    (b"a.b.example.net", "mx.example.test"),
    (b"example.net", "mx.example.test"),
])
def test_wildcard_covers_one_label(tls, name, expected):
    """A "*." entry matches exactly one extra label, nothing deeper or shorter."""
    cli = client(name)
    _srv, cerr, serr = handshake(tls, cli)
    assert (cerr, serr) == (None, None)
    assert names_seen(cli) == [expected]


def test_unknown_name_gets_default_certificate(tls):
    """A server name missing from the table falls back to the default certificate."""
    cli = client(b"other.example.com")
    _srv, cerr, serr = handshake(tls, cli)
    assert (cerr, serr) == (None, None)
    assert names_seen(cli) == ["mx.example.test"]


def test_sni_names_are_normalised_and_checked(files):
    """Table keys are lower-cased and a misplaced wildcard is a ValueError."""
    tls = ReloadableTLS(files["default"], files["default"], sni={"Submission.Example.ORG.": files["org"]})
    assert list(tls.sni) == ["submission.example.org"]
    for bad in ("mail.*.example.org", "*example.org", "", "a..b"):
        with pytest.raises(ValueError, match="SNI name"):
            ReloadableTLS(files["default"], files["default"], sni={bad: files["org"]})


# -- reload ---------------------------------------------------------------------

def test_reload_swaps_certificate_and_keeps_open_connections(ca, tls, files):
    """After reload new handshakes see the new certificates, and a connection
    made before still carries data with the old one."""
    old_cli = client(b"submission.example.org")
    old_srv, _, _ = handshake(tls, old_cli)
    old_default = client()
    handshake(tls, old_default)

    write_cert(ca, files["default"], "mx2.example.test", key_type=trustme.KeyType.RSA)
    write_cert(ca, files["org"], "submission.example.org", "smtp.example.org")
    tls.reload()

    new_default = client()
    handshake(tls, new_default)
    assert names_seen(new_default) == ["mx2.example.test"]
    new_cli = client(b"submission.example.org")
    handshake(tls, new_cli)
    assert names_seen(new_cli) == ["submission.example.org", "smtp.example.org"]

    assert names_seen(old_default) == ["mx.example.test"]
    assert names_seen(old_cli) == ["submission.example.org"]
    exchange(old_cli, old_srv, b"MAIL FROM:<a@example.org>\r\n")


@pytest.mark.parametrize("which", ["default", "org"])
def test_failed_reload_keeps_old_certificates(tls, files, which):
    """A garbage file makes reload raise ValueError naming it, and the old
    certificates stay in use."""
    with open(files[which], "wb") as f:
        f.write(b"this is not PEM\n")
    with pytest.raises(ValueError, match=os.path.basename(files[which])):
        tls.reload()
    for name, expected in ((None, "mx.example.test"),
                           (b"submission.example.org", "submission.example.org")):
        cli = client(name)
        handshake(tls, cli)
        assert names_seen(cli) == [expected]


# -- versions and ciphers ---------------------------------------------------------

def test_tls11_client_refused(tls):
    """A client limited to TLS 1.1 fails the handshake on the server side."""
    cli = client(min_version=SSL.TLS1_1_VERSION, max_version=SSL.TLS1_1_VERSION,
                 ciphers=b"DEFAULT:@SECLEVEL=0")
    _srv, cerr, serr = handshake(tls, cli)
    assert "unsupported protocol" in str(serr)
    assert cerr is not None


@pytest.mark.parametrize("cipher", [b"AES128-SHA", b"AES256-GCM-SHA384", b"ECDHE-RSA-AES128-SHA256"])
def test_tls12_weak_cipher_refused(tls, cipher):
    """A TLS 1.2 client offering only RSA key exchange or CBC is refused by the server."""
    cli = client(max_version=SSL.TLS1_2_VERSION, ciphers=cipher)
    _srv, cerr, serr = handshake(tls, cli)
    assert "no shared cipher" in str(serr)
    assert cerr is not None


def test_tls12_ecdhe_aead_accepted(tls):
    """A TLS 1.2 client offering ECDHE with AES-GCM completes the handshake."""
    cli = client(max_version=SSL.TLS1_2_VERSION, ciphers=b"ECDHE-RSA-AES128-GCM-SHA256")
    srv, cerr, serr = handshake(tls, cli)
    assert (cerr, serr) == (None, None)
    assert cli.get_protocol_version_name() == "TLSv1.2"
    assert srv.get_cipher_name() == "ECDHE-RSA-AES128-GCM-SHA256"


def test_tls13_by_default(tls):
    """An unrestricted client negotiates TLS 1.3."""
    cli = client(b"submission.example.org")
    srv, _, _ = handshake(tls, cli)
    assert srv.get_protocol_version_name() == "TLSv1.3"


def test_default_ciphers_are_ecdhe_aead_only():
    """DEFAULT_CIPHERS names only ECDHE suites with GCM or ChaCha20-Poly1305."""
    for name in DEFAULT_CIPHERS.split(":"):
        assert name.startswith("ECDHE-")
        assert "GCM" in name or "CHACHA20-POLY1305" in name


def test_custom_cipher_string(files):
    """The ciphers argument replaces the TLS 1.2 list; one that selects nothing is a ValueError."""
    tls = ReloadableTLS(files["default"], files["default"], ciphers="ECDHE-RSA-AES256-GCM-SHA384")
    cli = client(max_version=SSL.TLS1_2_VERSION)
    srv, _, _ = handshake(tls, cli)
    assert srv.get_cipher_name() == "ECDHE-RSA-AES256-GCM-SHA384"
    with pytest.raises(ValueError, match="ciphers"):
        ReloadableTLS(files["default"], files["default"], ciphers="NOSUCHCIPHER")


def test_context_disables_compression_tickets_and_renegotiation(tls):
    """The server contexts set OP_NO_COMPRESSION, OP_NO_TICKET and OP_NO_RENEGOTIATION."""
    wanted = SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    contexts = [tls.context, *tls._state.by_name.values()]
    for ctx in contexts:
        assert ctx.set_options(0) & wanted == wanted


# -- PEM bundles -------------------------------------------------------------------

def test_load_pem_bundle_returns_key_and_chain(ca, tmp_path):
    """A trustme key-and-chain file yields the key and the leaf certificate first."""
    path = write_cert(ca, tmp_path / "b.pem", "b.example")
    key_pem, chain = load_pem_bundle(path)
    assert b"PRIVATE KEY" in key_pem
    assert len(chain) >= 1
    leaf = x509.load_pem_x509_certificate(chain[0])
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == ["b.example"]


def _bundle_parts(ca):
    cert = ca.issue_cert("b.example")
    other = ca.issue_cert("c.example")
    return (cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes(),
            other.private_key_pem.bytes())


@pytest.mark.parametrize("content, message", [
    (lambda key, cert, other: cert, "no private key"),
    (lambda key, cert, other: key, "no certificate"),
    (lambda key, cert, other: other + cert, "does not match"),
    (lambda key, cert, other: key + other + cert, "2 private keys"),
    (lambda key, cert, other: b"", "no private key"),
])
def test_bundle_errors_name_the_file(ca, tmp_path, content, message):
    """An unusable bundle raises ValueError naming the file and the problem."""
    path = tmp_path / "broken.pem"
    path.write_bytes(content(*_bundle_parts(ca)))
    with pytest.raises(ValueError, match=message) as info:
        load_pem_bundle(str(path))
    assert str(path) in str(info.value)


def test_bundle_missing_file_named(tmp_path):
    """A bundle that cannot be read is a ValueError naming it."""
    path = str(tmp_path / "absent.pem")
    with pytest.raises(ValueError, match="cannot read") as info:
        load_pem_bundle(path)
    assert path in str(info.value)


def test_bad_sni_bundle_refused_at_construction(files, tmp_path):
    """A bad SNI bundle stops the constructor with ValueError naming the bundle."""
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.pem"):
        ReloadableTLS(files["default"], files["default"], sni={"x.example": str(bad)})


# -- Twisted integration --------------------------------------------------------------

class _Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class _Client(protocol.Protocol):
    received = b""
    lost = None

    def connectionMade(self):
        self.transport.write(b"EHLO client.example\r\n")

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = reason


def implicit_tls_session(tls, server_name: str, ca):
    """Connect a verifying client to TLSMemoryBIOFactory(tls, False, ...) through iosim."""
    clock = task.Clock()
    server_factory = TLSMemoryBIOFactory(tls, False, protocol.Factory.forProtocol(_Echo), clock)
    trust = ssl.Certificate.loadPEM(ca.cert_pem.bytes())
    client_factory = TLSMemoryBIOFactory(ssl.optionsForClientTLS(server_name, trustRoot=trust),
                                         True, protocol.Factory.forProtocol(_Client), clock)
    sp = server_factory.buildProtocol(None)
    cp = client_factory.buildProtocol(None)
    wrapped = cp.wrappedProtocol
    io = iosim.connect(sp, iosim.makeFakeServer(sp), cp, iosim.makeFakeClient(cp), clock=clock)
    io.flush()
    return wrapped


def test_implicit_tls_listener_with_sni_and_reload(ca, tls, files):
    """TLSMemoryBIOFactory(tls, False, factory) serves SNI certificates that a
    verifying client accepts, and picks up a reload for the next connection."""
    session = implicit_tls_session(tls, "submission.example.org", ca)
    assert session.received == b"EHLO client.example\r\n"

    session = implicit_tls_session(tls, "mx2.example.test", ca)
    assert session.received == b""
    assert session.lost.check(VerificationError)  # the default certificate does not name mx2

    write_cert(ca, files["default"], "mx2.example.test", key_type=trustme.KeyType.RSA)
    tls.reload()
    session = implicit_tls_session(tls, "mx2.example.test", ca)
    assert session.received == b"EHLO client.example\r\n"


def test_options_is_usable_with_starttls(tls):
    """tls.options provides IOpenSSLServerConnectionCreator and follows reloads."""
    assert tls.options is tls
    assert IOpenSSLServerConnectionCreator.providedBy(tls.options)
    before = tls.context
    tls.reload()
    assert tls.options.getContext() is tls.context is not before


# -- the default certificate helpers ------------------------------------------------------

def test_self_signed_certificate_loads(tmp_path):
    """make_self_signed writes a key (mode 0600) and certificate that load_certificate
    and ReloadableTLS accept."""
    cert, key = str(tmp_path / "c" / "cert.pem"), str(tmp_path / "k" / "key.pem")
    make_self_signed(cert, key, "mx.example.test")
    assert os.stat(key).st_mode & 0o777 == 0o600
    pair = load_certificate(cert, key)
    assert pair.original.to_cryptography().subject.rfc4514_string() == "CN=mx.example.test"
    cli = client(b"mx.example.test")
    handshake(ReloadableTLS(cert, key), cli)
    assert names_seen(cli) == ["mx.example.test"]


def test_load_certificate_rejects_garbage(tmp_path):
    """load_certificate keeps its "not a usable PEM" message for config checks."""
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a usable PEM"):
        load_certificate(str(bad), str(bad))
