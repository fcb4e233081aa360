"""api/sources.py: client source images are untrusted bytes or untrusted URLs; every refusal is a
400 whose rc says why and whose message names the field."""

from __future__ import annotations

import base64
import functools
import io
import ipaddress
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from api import sources
from api.errors import HordeError
from api.sources import SourceLimits, decode_source, ip_allowed, load_source, mask_from

LOCAL = SourceLimits(allow_private_urls=True)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def refused(value: str, rc: str, field: str = "source_image", **kw) -> HordeError:
    with pytest.raises(HordeError) as info:
        load_source(value, field, **kw)
    e = info.value
    assert (e.status, e.rc) == (400, rc), e.message
    assert e.message.startswith(f"{field}: "), e.message
    return e


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_png(width: int, height: int, rows: int) -> bytes:
    """A hand-written 8-bit grey PNG of `rows` black rows (all of them: a decompression bomb,
    400 MB of pixels in ~400 KB for 20000x20000; fewer: also truncated)."""
    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    idat = b"".join(z.compress(row) for _ in range(rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


@functools.lru_cache
def bomb() -> bytes:
    return grey_png(20000, 20000, 20000)


RED = Image.new("RGB", (32, 24), (255, 0, 0))


# -- base64 -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("prefix", [True, False])
def test_accepts_png_jpeg_webp(fmt, prefix):
    value = b64(encode(RED, fmt))
    if prefix:
        value = f"data:image/{fmt.lower()};base64,{value}"
    src = load_source(value, "source_image")
    assert (src.width, src.height, src.has_alpha) == (32, 24, False)
    assert src.image.mode == "RGB"
    r, g, b = src.image.getpixel((5, 5))
    assert r > 240 and g < 15 and b < 15
    again = Image.open(io.BytesIO(src.png))
    assert again.format == "PNG" and again.size == (32, 24)
    assert again.convert("RGB").tobytes() == src.image.tobytes()  # lossless


@pytest.mark.parametrize("fmt,name", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_formats_refused(fmt, name):
    e = refused(b64(encode(RED, fmt)), "SourceImageUnsupported", field="source_mask")
    assert name in e.message


def test_garbage_refused():
    refused(b64(b"hello, this is not an image at all"), "SourceImageInvalid")
    refused("***not base64***", "SourceImageInvalid")
    refused("", "SourceImageInvalid")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_refused(fmt):
    noise = Image.effect_noise((256, 256), 64).convert("RGB")
    data = encode(noise, fmt)
    refused(b64(data[: len(data) // 2]), "SourceImageInvalid")


def test_bomb_refused_by_pixel_count_before_decoding():
    # 4000x4000 with only 10 rows of data: decoding would fail as truncated (Invalid); the
    # refusal for pixels proves the header was checked first.
    e = refused(b64(grey_png(4000, 4000, 10)), "SourceImageTooManyPixels")
    assert "4000x4000" in e.message
    start = time.monotonic()
    data = bomb()
    assert len(data) < 1024 * 1024
    refused(b64(data), "SourceImageTooManyPixels", field="source_mask")
    assert time.monotonic() - start < 5


def test_pil_bomb_guard_is_a_400(monkeypatch):
    # Should PIL's own guard fire first (set lower by someone), it is still a 400.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    e = refused(b64(encode(RED, "PNG")), "SourceImageTooManyPixels",
                limits=SourceLimits(max_pixels=100))
    assert "32x24" not in e.message  # PIL's refusal, not ours


def test_pixel_limit():
    refused(b64(encode(RED, "PNG")), "SourceImageTooManyPixels",
            limits=SourceLimits(max_pixels=32 * 24 - 1))
    assert load_source(b64(encode(RED, "PNG")), "f", SourceLimits(max_pixels=32 * 24)).width == 32


def test_byte_limit():
    data = encode(Image.effect_noise((64, 64), 64), "PNG")
    refused(b64(data), "SourceImageTooLarge", limits=SourceLimits(max_bytes=len(data) - 1))
    refused(b64(data) * 3, "SourceImageTooLarge", limits=SourceLimits(max_bytes=len(data)))
    assert load_source(b64(data), "f", SourceLimits(max_bytes=len(data))).width == 64


def test_alpha_kept_and_detected():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    src = load_source(b64(encode(rgba, "PNG")), "source_image")
    assert src.image.mode == "RGBA" and not src.has_alpha  # alpha kept, but fully opaque
    rgba.putpixel((0, 0), (0, 0, 255, 0))
    for fmt in ("PNG", "WEBP"):
        extra = {"lossless": True} if fmt == "WEBP" else {}
        src = load_source(b64(encode(rgba, fmt, **extra)), "x")
        assert src.image.mode == "RGBA" and src.has_alpha
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 0
    pal.putpixel((1, 1), 0)
    assert load_source(b64(encode(pal, "PNG", transparency=0)), "x").has_alpha


def test_animated_uses_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    src = load_source(b64(buf.getvalue()), "source_image")
    assert src.image.getpixel((8, 8)) == (255, 0, 0)


def test_exif_orientation_applied_and_16bit_grey_scaled():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    src = load_source(b64(encode(RED, "JPEG", exif=exif.tobytes())), "x")
    assert (src.width, src.height) == (24, 32)
    grey = Image.frombytes("I;16", (4, 4), struct.pack("<H", 40000) * 16)
    assert load_source(b64(encode(grey, "PNG")), "x").image.getpixel((0, 0))[0] == 156


# -- masks --------------------------------------------------------------------------------

def test_mask_from_alpha():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    rgba.putpixel((2, 3), (10, 20, 30, 0))
    rgba.putpixel((4, 4), (10, 20, 30, 100))
    src = decode_source(encode(rgba, "PNG"), "source_image", SourceLimits())
    mask = mask_from(src, None)
    assert mask.mode == "L" and mask.size == (8, 8)
    assert (mask.getpixel((2, 3)), mask.getpixel((4, 4)), mask.getpixel((0, 0))) == (255, 155, 0)


def test_mask_from_explicit_mask_resized():
    src = decode_source(encode(RED, "PNG"), "source_image", SourceLimits())
    m = Image.new("RGB", (64, 48), (0, 0, 0))
    m.paste((255, 255, 255), (0, 0, 32, 48))  # left half white
    mask = mask_from(src, decode_source(encode(m, "PNG"), "source_mask", SourceLimits()))
    assert mask.mode == "L" and mask.size == (32, 24)
    assert mask.getpixel((2, 12)) > 250 and mask.getpixel((29, 12)) < 5


def test_no_mask():
    assert mask_from(decode_source(encode(RED, "PNG"), "x", SourceLimits()), None) is None
    opaque = Image.new("RGBA", (4, 4), (1, 2, 3, 255))
    assert mask_from(decode_source(encode(opaque, "PNG"), "x", SourceLimits()), None) is None


# -- URLs ---------------------------------------------------------------------------------

PNG = encode(RED, "PNG")


class Handler(BaseHTTPRequestHandler):
    hosts: list[str] = []

    def log_message(self, *args):
        pass

    def send(self, status: int, body: bytes = b"", **headers):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        if "Content_Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: C901 - a test server's routes
        path = self.path
        Handler.hosts.append(self.headers.get("Host"))
        try:
            if path == "/img.png":
                self.send(200, PNG, Content_Type="text/plain")  # the type is ignored
            elif path.startswith("/redirect?to="):
                self.send(302, Location=path.split("=", 1)[1])
            elif path.startswith("/chain/"):
                n = int(path.rsplit("/", 1)[1])
                self.send(302, Location=f"/chain/{n - 1}" if n > 1 else "/img.png")
            elif path == "/big":  # no Content-Length: cut off by counting
                self.send_response(200)
                self.end_headers()
                for _ in range(200):
                    self.wfile.write(b"\0" * 65536)
            elif path == "/big-declared":
                self.send(200, b"\0" * 10, Content_Length=str(10**9))
            elif path == "/stall":
                time.sleep(4)
                self.send(200, PNG)
            elif path == "/trickle":
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif path == "/gzip":
                self.send(200, zlib.compress(PNG), Content_Encoding="gzip")
            elif path == "/500":
                self.send(500, b"oops")
            else:
                self.send(404, b"nope")
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_url_fetched_when_private_allowed(server):
    src = load_source(f"{server}/img.png", "source_image", LOCAL)
    assert (src.width, src.height) == (32, 24)
    assert load_source(f"{server}/chain/3", "source_image", LOCAL).width == 32  # 3 redirects


def test_url_connects_to_the_checked_address_with_the_hosts_name(server, monkeypatch):
    port = server.rsplit(":", 1)[1]
    monkeypatch.setattr(sources, "_resolve", lambda host, port, timeout: ["127.0.0.1"])
    Handler.hosts.clear()
    assert load_source(f"http://images.example:{port}/img.png", "source_image", LOCAL).width == 32
    assert Handler.hosts == [f"images.example:{port}"]


def test_loopback_refused_by_default(server):
    Handler.hosts.clear()
    e = refused(f"{server}/img.png", "SourceUrlRefused")
    assert "private" in e.message
    port = server.rsplit(":", 1)[1]
    refused(f"http://localhost:{port}/img.png", "SourceUrlRefused", field="source_mask")
    assert Handler.hosts == []  # never connected


@pytest.mark.parametrize("url", [
    "http://10.1.2.3/x.png", "http://169.254.169.254/latest/meta-data", "http://[::1]:80/",
    "http://[::ffff:127.0.0.1]/x", "http://0.0.0.0/", "http://224.0.0.1/", "http://192.168.0.1/",
    "https://[fe80::1]/", "http://2130706433/", "http://100.64.0.1/",
])
def test_private_addresses_refused(url):
    refused(url, "SourceUrlRefused")


def test_mixed_dns_answer_refused(monkeypatch):
    monkeypatch.setattr(sources, "_resolve", lambda h, p, t: ["93.184.216.34", "127.0.0.1"])
    refused("http://rebind.example/x.png", "SourceUrlRefused")


def test_ip_allowed():
    good = ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "64:ff9b::808:808"]
    bad = ["127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
           "224.0.0.1", "240.0.0.1", "255.255.255.255", "100.64.0.1", "::1", "::", "fe80::1",
           "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::7f00:1",
           "2002:7f00:1::", "2001:db8::1"]
    assert all(ip_allowed(ipaddress.ip_address(a)) for a in good)
    assert not any(ip_allowed(ipaddress.ip_address(a)) for a in bad)


@pytest.mark.parametrize("url", ["ftp://example.com/x.png", "file:///etc/passwd", "gopher://x/"])
def test_other_schemes_refused(url):
    refused(url, "SourceUrlRefused")


def test_urls_refused_when_no_fetcher(server):
    refused(f"{server}/img.png", "SourceUrlRefused", limits=LOCAL, fetch=None)


def test_redirect_to_loopback_refused(server, monkeypatch):
    # 127.0.0.1 stands for a public host here; 127.0.0.2 stays private.
    real = sources.ip_allowed
    monkeypatch.setattr(sources, "ip_allowed", lambda ip: str(ip) == "127.0.0.1" or real(ip))
    port = server.rsplit(":", 1)[1]
    assert load_source(f"{server}/img.png", "source_image").width == 32
    refused(f"{server}/redirect?to=http://127.0.0.2:{port}/img.png", "SourceUrlRefused")
    refused(f"{server}/redirect?to=http://[::1]:{port}/img.png", "SourceUrlRefused")
    refused(f"{server}/redirect?to=file:///etc/passwd", "SourceUrlRefused")


def test_too_many_redirects(server):
    e = refused(f"{server}/chain/4", "SourceUrlRefused", limits=LOCAL)
    assert "redirects" in e.message


def test_byte_cap_when_streaming(server):
    limits = SourceLimits(max_bytes=200_000, allow_private_urls=True)
    start = time.monotonic()
    refused(f"{server}/big", "SourceImageTooLarge", limits=limits)
    refused(f"{server}/big-declared", "SourceImageTooLarge", limits=limits)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("path", ["/stall", "/trickle"])
def test_stalling_server_times_out(server, path):
    limits = SourceLimits(fetch_timeout_seconds=0.6, allow_private_urls=True)
    start = time.monotonic()
    e = refused(f"{server}{path}", "SourceUrlFailed", limits=limits)
    assert "0.6s" in e.message
    assert time.monotonic() - start < 1.5  # the whole fetch, not each read


@pytest.mark.parametrize("path,code", [("/missing", "404"), ("/500", "500")])
def test_remote_errors_are_400(server, path, code):
    e = refused(f"{server}{path}", "SourceUrlFailed", field="source_mask", limits=LOCAL)
    assert code in e.message


def test_compressed_response_refused(server):
    refused(f"{server}/gzip", "SourceUrlRefused", limits=LOCAL)


def test_connection_refused_is_400(server):
    refused("http://127.0.0.1:1/x.png", "SourceUrlFailed", limits=LOCAL)


def test_https_pinned_address_and_certificate_checked_against_host_name(tmp_path, monkeypatch):
    x509 = pytest.importorskip("cryptography.x509")
    import datetime
    import ssl

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "images.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.example")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    httpd.socket = server_ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        monkeypatch.setattr(sources, "_resolve", lambda h, p, t: ["127.0.0.1"])
        url = f"https://images.example:{port}/img.png"
        refused(url, "SourceUrlFailed", limits=LOCAL)  # not a CA anyone trusts
        monkeypatch.setattr(sources, "VERIFY", ssl.create_default_context(
            cafile=str(tmp_path / "c.pem")))
        Handler.hosts.clear()
        assert load_source(url, "source_image", LOCAL).width == 32
        assert Handler.hosts == [f"images.example:{port}"]
        refused(f"https://other.example:{port}/img.png", "SourceUrlFailed", limits=LOCAL)
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- name resolution within a deadline (issue 21, finding 12) ------------------------------

class SlowDns:
    """socket.getaddrinfo stand-in: names starting with "slow" hang until `release` is set;
    any other name resolves to loopback. Counts the look-ups of each name, and lets a test
    wait until `n` slow look-ups are hanging."""

    def __init__(self):
        self.release = threading.Event()
        self.calls: dict[str, int] = {}
        self.hanging = 0
        self.cond = threading.Condition()
        self.real = sources.socket.getaddrinfo

    def __call__(self, host, port, *args, **kwargs):
        with self.cond:
            self.calls[host] = self.calls.get(host, 0) + 1
            slow = host.startswith("slow")
            self.hanging += slow
            self.cond.notify_all()
        if slow:
            self.release.wait(60)
            with self.cond:
                self.hanging -= 1
                self.cond.notify_all()
            raise sources.socket.gaierror("no such name")
        return self.real("127.0.0.1", port, *args, **kwargs)

    def wait_hanging(self, n: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: self.hanging == n, timeout=10), self.hanging


@pytest.fixture
def slow_dns(monkeypatch):
    dns = SlowDns()
    monkeypatch.setattr(sources.socket, "getaddrinfo", dns)
    yield dns
    dns.release.set()
    dns.wait_hanging(0)


def test_slow_look_ups_never_hold_up_another_hosts(slow_dns):
    """Ten names that never answer, each waited on by a caller past its deadline: a look-up of
    any other name still answers at once (four such names used to stall every fetch)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(10) as pool:
        waiting = [pool.submit(sources._resolve, f"slow-{i}.example", 80, 0.5) for i in range(10)]
        slow_dns.wait_hanging(10)
        started = time.monotonic()
        assert sources._resolve("fast.example", 80, 2.0) == ["127.0.0.1"]
        assert time.monotonic() - started < 1.0
        for f in waiting:  # each slow caller was let go at its own deadline
            with pytest.raises(TimeoutError):
                f.result(timeout=5)


def test_callers_of_one_slow_host_share_one_look_up(slow_dns):
    from concurrent.futures import ThreadPoolExecutor

    resolver = sources.Resolver(max_lookups=2)
    with ThreadPoolExecutor(8) as pool:
        waiting = [pool.submit(resolver.resolve, "slow.example", 80, 1.0) for _ in range(8)]
        slow_dns.wait_hanging(1)
        for f in waiting:
            with pytest.raises(TimeoutError):
                f.result(timeout=5)
    assert slow_dns.calls["slow.example"] == 1


def test_look_ups_are_bounded_and_a_full_resolver_times_out_as_a_400(slow_dns, monkeypatch):
    resolver = sources.Resolver(max_lookups=2)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(resolver.resolve, f"slow-{i}.example", 80, 3.0) for i in range(2)]
        slow_dns.wait_hanging(2)
        # Both threads are taken: a third name waits for one until its deadline, no longer.
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            resolver.resolve("fast.example", 80, 0.3)
        assert 0.25 < time.monotonic() - started < 2.0
        assert "fast.example" not in slow_dns.calls
        # Through a fetch, that is a 400 naming the field, not a hang or a 500.
        monkeypatch.setattr(sources, "_resolver", resolver)
        err = refused("http://fast.example/a.png", "SourceUrlFailed",
                      limits=SourceLimits(fetch_timeout_seconds=0.5))
        assert "took over" in err.message
        slow_dns.release.set()
        for f in held:
            with pytest.raises(OSError):
                f.result(timeout=5)
    # Threads freed: the same resolver answers again.
    assert resolver.resolve("fast.example", 80, 2.0) == ["127.0.0.1"]
