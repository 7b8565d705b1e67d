import pytest

from queues.captioners.fetch import fetch_image
from queues.errors import PermanentCaptionError, TransientCaptionError
from tests.conftest import respond


def test_fetches_media_file_and_http_image(media_image, http_server, png_bytes, settings):
    reference = media_image("a/b.png")
    assert fetch_image(reference, timeout=5) == (settings.MEDIA_ROOT / "a/b.png").read_bytes()
    image = png_bytes()
    assert fetch_image(http_server.route("/x.png", respond(200, image, "image/png")), timeout=5) == image


@pytest.mark.parametrize("reference, message", [
    ("file:///etc/passwd", "unsupported URL scheme 'file'"),
    ("ftp://example.com/a.png", "unsupported URL scheme 'ftp'"),
    ("gopher://example.com/", "unsupported URL scheme 'gopher'"),
    ("../outside.png", "outside the media root"),
])
def test_refuses_schemes_and_paths(reference, message, settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    with pytest.raises(PermanentCaptionError, match=message):
        fetch_image(reference, timeout=5)


def test_refuses_loopback_and_private_addresses_unless_allowed(http_server, png_bytes, settings):
    url = http_server.route("/x.png", respond(200, png_bytes(), "image/png"))
    settings.IMAGE_FETCH_ALLOW_PRIVATE = False
    with pytest.raises(PermanentCaptionError, match="non-public address 127.0.0.1"):
        fetch_image(url, timeout=5)
    for private in ("http://10.0.0.8/a.png", "http://192.168.1.1/a.png", "http://169.254.169.254/latest/meta-data",
                    "http://[::1]/a.png"):
        with pytest.raises(PermanentCaptionError, match="non-public address"):
            fetch_image(private, timeout=5)
    assert http_server.requests == []
    settings.IMAGE_FETCH_ALLOW_PRIVATE = True
    assert fetch_image(url, timeout=5)


def test_follows_http_redirects_but_not_to_other_schemes(http_server, png_bytes, settings):
    image = png_bytes()
    http_server.route("/real.png", respond(200, image, "image/png"))
    moved = http_server.route("/moved", respond(301, b"", headers={"Location": http_server.url + "/real.png"}))
    assert fetch_image(moved, timeout=5) == image
    url = http_server.route("/go", respond(302, b"", headers={"Location": "file:///etc/passwd"}))
    with pytest.raises(PermanentCaptionError, match="HTTP 302 with a redirect that is not followed"):
        fetch_image(url, timeout=5)


def test_size_limit_by_header_and_by_stream(http_server, settings):
    big = b"\x89PNG" + b"0" * 5000
    declared = http_server.route("/declared.png", respond(200, big, "image/png"))
    with pytest.raises(PermanentCaptionError, match="5004 bytes, larger than the limit of 1000 bytes"):
        fetch_image(declared, timeout=5, max_bytes=1000)

    def chunked(request, _body):
        request.send_response(200)
        request.send_header("Content-Type", "image/png")
        request.send_header("Connection", "close")
        request.end_headers()
        for _ in range(10):
            request.wfile.write(b"0" * 500)
        request.close_connection = True

    undeclared = http_server.route("/undeclared.png", chunked)
    with pytest.raises(PermanentCaptionError, match="larger than the limit of 1000 bytes"):
        fetch_image(undeclared, timeout=5, max_bytes=1000)


def test_time_limit_is_transient(http_server):
    slow = http_server.route("/slow.png", respond(200, b"x", "image/png", delay=3))
    with pytest.raises(TransientCaptionError, match="did not answer within 1 s|cannot reach"):
        fetch_image(slow, timeout=1)

    def dribble(request, _body):
        import time

        request.send_response(200)
        request.send_header("Content-Length", "100000")
        request.end_headers()
        try:
            for _ in range(40):
                request.wfile.write(b"0" * 100)
                request.wfile.flush()
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass

    dribbling = http_server.route("/dribble.png", dribble)
    with pytest.raises(TransientCaptionError, match="took longer than 1 s"):
        fetch_image(dribbling, timeout=1)


@pytest.mark.parametrize("status, error", [(404, PermanentCaptionError), (403, PermanentCaptionError),
                                           (500, TransientCaptionError), (429, TransientCaptionError)])
def test_http_status_classification(http_server, status, error):
    url = http_server.route("/s.png", respond(status, b"nope", "text/plain"))
    with pytest.raises(error, match=f"HTTP {status}"):
        fetch_image(url, timeout=5)


class ScriptedDNS:
    """DNS for one made-up name, answering from a script (DNS lives outside; everything else resolves as usual)."""

    def __init__(self, monkeypatch, name, answers):
        import socket

        self.name, self.answers, self.lookups = name, list(answers), 0
        real = socket.getaddrinfo

        def getaddrinfo(host, port, *args, **kwargs):
            if host != name:
                return real(host, port, *args, **kwargs)
            self.lookups += 1
            address = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_connection_goes_to_the_checked_address(http_server, png_bytes, settings, monkeypatch):
    image = png_bytes()
    url = http_server.route("/x.png", respond(200, image, "image/png"))
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    dns = ScriptedDNS(monkeypatch, "images.portal-test", ["127.0.0.1"])
    settings.IMAGE_FETCH_ALLOW_PRIVATE = True
    assert fetch_image(f"http://images.portal-test:{port}/x.png", timeout=5) == image
    assert http_server.requests[0]["headers"]["Host"] == f"images.portal-test:{port}"
    assert dns.lookups == 2  # the early check, then the connection's own lookup (no third one by urllib)


def test_dns_rebinding_between_check_and_connect_is_refused(http_server, png_bytes, settings, monkeypatch):
    url = http_server.route("/x.png", respond(200, png_bytes(), "image/png"))
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    # A public answer for the check, then the loopback address for whoever asks next.
    dns = ScriptedDNS(monkeypatch, "rebind.portal-test", ["93.184.216.34", "127.0.0.1"])
    settings.IMAGE_FETCH_ALLOW_PRIVATE = False
    with pytest.raises(PermanentCaptionError, match="non-public address 127.0.0.1"):
        fetch_image(f"http://rebind.portal-test:{port}/x.png", timeout=5)
    assert dns.lookups == 2 and http_server.requests == []



def test_https_through_the_checked_connection_verifies_the_certificate(tmp_path, settings, monkeypatch):
    """A TLS server with a self-signed certificate: the handshake runs on our connection and is refused."""
    import datetime
    import http.server
    import ssl
    import threading

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.portal-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.portal-test")]), critical=False)
                   .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dns = ScriptedDNS(monkeypatch, "images.portal-test", ["127.0.0.1"])
        settings.IMAGE_FETCH_ALLOW_PRIVATE = True
        with pytest.raises(TransientCaptionError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch_image(f"https://images.portal-test:{server.server_port}/x.png", timeout=5)
        assert dns.lookups == 2
    finally:
        server.shutdown()
        server.server_close()
