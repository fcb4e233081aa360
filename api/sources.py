"""Source images and masks from clients: untrusted bytes, or untrusted URLs that we fetch.

`source_image`, `source_mask` and `extra_source_images[].image` arrive as base64 (with or
without a `data:image/...;base64,` prefix) or as an http(s) URL. They are decoded here once,
checked, and re-encoded as lossless PNG; only that PNG is stored and handed to workers, so no
worker ever parses what a client sent and workers see one format.

Every failure is `HordeError(400, rc, "<field>: ...")`, never a 500. The rc codes:

  SourceImageInvalid        not base64, not an image, or truncated/corrupt pixel data
  SourceImageUnsupported    an image, but not PNG, JPEG or WebP (the format PIL detects
                            decides, never the URL's suffix or the Content-Type)
  SourceImageTooLarge       over `max_bytes` (decoded base64, or bytes fetched)
  SourceImageTooManyPixels  width*height over `max_pixels`, read from the header before any
                            pixel is decoded (decompression bombs)
  SourceUrlRefused          not http(s), malformed, a host resolving to a non-public address
                            (also after a redirect), over 3 redirects, a compressed response
  SourceUrlFailed           unknown host, connection error, timeout, remote 4xx/5xx

Animated images (APNG, animated WebP, multi-picture JPEG) are accepted: the first frame is
used. A JPEG's EXIF orientation is applied, since the stored PNG has no EXIF to honour it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import io
import re
import socket
import ssl
import time
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

import httpcore
import httpx
from PIL import Image, ImageOps

from api.errors import HordeError

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_REDIRECTS = 3
_CHUNK = 64 * 1024
# Formats we refuse, recognised by signature only to name them in the error: no other PIL
# plugin ever parses client data.
_SIGNATURES = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"),
               (b"\0\0\1\0", "ICO"), (b"8BPS", "PSD"), (b"qoif", "QOI"))
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA = re.compile(r"^data:[^,]*;base64,", re.I)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Certificates of https URLs are verified against the URL's host name (certifi's CAs); tests
# put an SSLContext trusting their own CA here.
VERIFY: ssl.SSLContext | bool = True


@dataclass(frozen=True)
class SourceLimits:
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 3072 * 3072
    fetch_timeout_seconds: float = 10.0  # the whole fetch: DNS, connect, redirects, body
    allow_private_urls: bool = False  # tests and closed deployments only


@dataclass(frozen=True)
class SourceImage:
    image: Image.Image  # loaded, RGB or RGBA (RGBA whenever the source had an alpha channel)
    png: bytes  # what gets stored
    width: int
    height: int
    has_alpha: bool  # an alpha channel that is not fully opaque


Fetch = Callable[[str, str, SourceLimits], bytes]
# Called with (field, width * height) once an image's header is read and before any of its
# pixels are decoded: the caller's pixel budget (api/routes/deps.py `pixel_budget`), which
# raises to refuse the image.
Charge = Callable[[str, int], None]


def _fail(rc: str, field: str, message: str) -> HordeError:
    return HordeError(400, rc, f"{field}: {message}")


# -- URLs ---------------------------------------------------------------------------------

def ip_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Public unicast only. IPv6 forms that embed an IPv4 address (mapped, NAT64, 6to4) are
    judged by the IPv4 address they reach."""
    if ip.version == 6:
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour:
            ip = ip.sixtofour
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


class Resolver:
    """getaddrinfo within a deadline. getaddrinfo has no timeout of its own and cannot be
    interrupted, so each look-up runs on a thread of its own and its caller waits at most
    until its fetch's deadline, then goes on (TimeoutError) while the thread finishes alone.
    At most `max_lookups` threads run at once, and callers asking for the same host at once
    share one look-up: a handful of slow names (a pool of 4 threads once) no longer blocks
    every other fetch, and many requests naming one slow host cost one thread."""

    def __init__(self, max_lookups: int = 32):
        self._slots = threading.BoundedSemaphore(max_lookups)
        self._lock = threading.Lock()
        self._running: dict[tuple[str, int], Future] = {}

    def resolve(self, host: str, port: int, timeout: float) -> list[str]:
        key = (host.lower(), port)
        deadline = time.monotonic() + timeout
        with self._lock:
            future = self._running.get(key)
        if future is None:
            if not self._slots.acquire(timeout=max(0.0, timeout)):
                raise TimeoutError("every look-up thread is busy")
            with self._lock:
                future = self._running.get(key)
                started = future is None
                if started:
                    future = self._running[key] = Future()
            if started:
                threading.Thread(target=self._look_up, args=(key, future), daemon=True,
                                 name="rayhorde-resolve").start()
            else:
                self._slots.release()
        return future.result(timeout=max(0.0, deadline - time.monotonic()))

    def _look_up(self, key: tuple[str, int], future: Future) -> None:
        try:
            infos = socket.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
            future.set_result([info[4][0].split("%")[0] for info in infos])
        except BaseException as e:  # handed to every caller waiting on it
            future.set_exception(e)
        finally:
            with self._lock:
                self._running.pop(key, None)
            self._slots.release()


_resolver = Resolver()


def _resolve(host: str, port: int, timeout: float) -> list[str]:
    return _resolver.resolve(host, port, timeout)


class _Deadline:
    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self, timeout: float | None = None) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise httpcore.ReadTimeout(f"over {self.seconds}s")
        return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    """Every read and write waits at most until the fetch's deadline, so a server trickling
    one byte at a time cannot stretch the fetch past it."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: _Deadline):
        self.inner, self.deadline = inner, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self.inner.read(max_bytes, self.deadline.left(timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.inner.write(buffer, self.deadline.left(timeout))

    def close(self) -> None:
        self.inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None) -> _Stream:
        inner = self.inner.start_tls(ssl_context, server_hostname, self.deadline.left(timeout))
        return _Stream(inner, self.deadline)

    def get_extra_info(self, info: str):
        return self.inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """Resolves the host, checks every address, and connects to the address it checked: the
    check and the connection can't see different DNS answers (rebinding), and a redirect's
    target is checked the same way since it needs a connection too. TLS still verifies the
    certificate against the host name (httpcore passes it to start_tls)."""

    def __init__(self, field: str, limits: SourceLimits, deadline: _Deadline):
        self.field, self.limits, self.deadline = field, limits, deadline
        self.inner = httpcore.SyncBackend()

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            addresses = _resolve(host, port, self.deadline.left(timeout))
        except TimeoutError:
            raise httpcore.ConnectTimeout("name resolution") from None
        except (OSError, UnicodeError):
            raise _fail("SourceUrlFailed", self.field, f"unknown host {host}") from None
        if not self.limits.allow_private_urls and not all(
                ip_allowed(ipaddress.ip_address(a)) for a in addresses):
            # The address itself is not echoed: that would map internal DNS for a caller.
            raise _fail("SourceUrlRefused", self.field,
                        f"{host} resolves to a private or reserved address")
        stream = self.inner.connect_tcp(addresses[0], port, self.deadline.left(timeout),
                                        local_address, socket_options)
        return _Stream(stream, self.deadline)

    def connect_unix_socket(self, *args, **kwargs):
        raise httpcore.ConnectError("no unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def fetch_url(url: str, field: str, limits: SourceLimits) -> bytes:
    """GET an http(s) URL: at most MAX_REDIRECTS redirects (each target checked like the
    first), at most `max_bytes` read, all within `fetch_timeout_seconds`. Proxy settings of
    the environment are ignored (trust_env=False): the proxy, not us, would pick the peer."""
    deadline = _Deadline(limits.fetch_timeout_seconds)
    transport = httpx.HTTPTransport(verify=VERIFY, trust_env=False)
    pool = transport._pool  # httpx 0.28 / httpcore 1.x internals; fail loudly if they move
    if not isinstance(getattr(pool, "_network_backend", None), httpcore.NetworkBackend):
        raise RuntimeError("httpcore changed: source URLs would go unchecked")
    pool._network_backend = _Backend(field, limits, deadline)
    headers = {"Accept": "image/png, image/jpeg, image/webp", "Accept-Encoding": "identity",
               "User-Agent": "rayhorde-source-fetch"}
    try:
        with httpx.Client(transport=transport, follow_redirects=False, trust_env=False,
                          timeout=limits.fetch_timeout_seconds, headers=headers) as client:
            for _ in range(MAX_REDIRECTS + 1):
                target = httpx.URL(url)
                if target.scheme not in ("http", "https") or not target.host:
                    raise _fail("SourceUrlRefused", field,
                                "only http and https URLs are accepted")
                with client.stream("GET", target) as r:
                    if r.is_redirect:
                        url = str(target.join(r.headers["location"]))
                        continue
                    if r.status_code != 200:
                        raise _fail("SourceUrlFailed", field,
                                    f"the URL answered HTTP {r.status_code}")
                    return _read(r, field, limits)
            raise _fail("SourceUrlRefused", field, f"more than {MAX_REDIRECTS} redirects")
    except httpx.TimeoutException:
        raise _fail("SourceUrlFailed", field,
                    f"fetching the URL took over {limits.fetch_timeout_seconds}s") from None
    except httpx.InvalidURL:
        raise _fail("SourceUrlRefused", field, "not a valid URL") from None
    except httpx.HTTPError as e:
        raise _fail("SourceUrlFailed", field,
                    f"could not fetch the URL ({type(e).__name__})") from None


def _read(r: httpx.Response, field: str, limits: SourceLimits) -> bytes:
    # Raw bytes only: decompressing a Content-Encoding could expand past any cap in one chunk.
    if r.headers.get("content-encoding", "identity").lower() not in ("identity", ""):
        raise _fail("SourceUrlRefused", field,
                    "compressed (Content-Encoding) responses are refused")
    too_big = _fail("SourceImageTooLarge", field, f"more than {limits.max_bytes} bytes")
    length = r.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > limits.max_bytes:
        raise too_big
    data = bytearray()
    for chunk in r.iter_raw(_CHUNK):
        data += chunk
        if len(data) > limits.max_bytes:
            raise too_big
    return bytes(data)


# -- Images -------------------------------------------------------------------------------

def _b64(value: str, field: str, limits: SourceLimits) -> bytes:
    text = "".join(_DATA.sub("", value, count=1).split())  # line-wrapped base64 too
    if len(text) // 4 * 3 > limits.max_bytes + 3:  # refuse before allocating the bytes
        raise _fail("SourceImageTooLarge", field, f"more than {limits.max_bytes} bytes")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise _fail("SourceImageInvalid", field,
                    "neither base64 image data nor an http(s) URL") from None


def _normalized(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: RGB conversion would clip
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    return img.convert("RGBA" if alpha else "RGB")


def decode_source(data: bytes, field: str, limits: SourceLimits,
                  charge: Charge | None = None) -> SourceImage:
    if len(data) > limits.max_bytes:
        raise _fail("SourceImageTooLarge", field, f"more than {limits.max_bytes} bytes")
    # PIL's own bomb guard stays on as a backstop (never off, never below our limit); its
    # error is caught below, so it can't become a 500 either.
    if Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS < limits.max_pixels:
        Image.MAX_IMAGE_PIXELS = limits.max_pixels
    too_many = f"over the limit of {limits.max_pixels} pixels"
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _fail("SourceImageTooManyPixels", field, too_many) from None
    except Exception:
        name = next((n for sig, n in _SIGNATURES if data.startswith(sig)), None)
        if name is None and data[4:8] == b"ftyp":
            name = "HEIF/AVIF"
        if name:
            raise _fail("SourceImageUnsupported", field,
                        f"{name} images are not accepted; send PNG, JPEG or WebP") from None
        raise _fail("SourceImageInvalid", field, "not a PNG, JPEG or WebP image") from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise _fail("SourceImageTooManyPixels", field, f"{width}x{height} is {too_many}")
    if charge is not None:
        charge(field, width * height)
    try:
        img.seek(0)  # animated: the first frame
        img.load()
        img = _normalized(ImageOps.exif_transpose(img))
        buf = io.BytesIO()
        img.save(buf, "PNG")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _fail("SourceImageTooManyPixels", field, too_many) from None
    except Exception:
        raise _fail("SourceImageInvalid", field, "truncated or corrupt image data") from None
    has_alpha = img.mode == "RGBA" and img.getchannel("A").getextrema()[0] < 255
    return SourceImage(img, buf.getvalue(), img.width, img.height, has_alpha)


def load_source(value: str, field: str, limits: SourceLimits = SourceLimits(),
                fetch: Fetch | None = fetch_url, charge: Charge | None = None) -> SourceImage:
    """Base64 or an http(s) URL -> a checked image. `fetch=None` refuses URLs; `charge` counts
    the image's pixels before they are decoded. Blocking (the fetch and the decoding): call it
    from a thread pool, not on the event loop."""
    value = (value or "").strip()
    if not value:
        raise _fail("SourceImageInvalid", field, "empty")
    if _URL.match(value):
        if fetch is None:
            raise _fail("SourceUrlRefused", field, "URLs are not accepted here")
        if not value.lower().startswith(("http://", "https://")):
            raise _fail("SourceUrlRefused", field, "only http and https URLs are accepted")
        return decode_source(fetch(value, field, limits), field, limits, charge)
    return decode_source(_b64(value, field, limits), field, limits, charge)


def mask_from(source: SourceImage, mask: SourceImage | None,
              field: str = "source_mask") -> Image.Image | None:
    """The inpainting mask, mode "L", white = repaint, at the source's size: the explicit mask
    (its luminance), else the source's transparency (255 - alpha), else None. `field` names
    the mask in the errors of callers that validate it further."""
    if mask is not None:
        out = mask.image.convert("L")
        if out.size != source.image.size:
            out = out.resize(source.image.size, Image.LANCZOS)
        return out
    if source.has_alpha:
        return source.image.getchannel("A").point(lambda v: 255 - v)
    return None
