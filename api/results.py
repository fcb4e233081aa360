"""What a worker submits as an image result is checked before it is stored or paid: a WebP,
PNG or JPEG (the format its bytes say, never a name or a content type), of the size the job
makes, within a size cap. Workers are untrusted: without this, any bytes (an HTML page, a
video, 15 MB of noise) were stored, paid for and handed to the requester as an image.

Only the header is read (PIL opens lazily): the check costs microseconds, and no pixel of an
oversized image is ever decoded.
"""

from __future__ import annotations

import io

from PIL import Image

from api.errors import HordeError

RESULT_FORMATS = ("WEBP", "PNG", "JPEG")
# Bytes a result may take beyond four per pixel (RGBA, uncompressed): headers, metadata.
RESULT_SLACK_BYTES = 1024 * 1024


def result_cap(settings, width: int, height: int) -> int:
    """The most bytes an image result of `width` x `height` may take: what its pixels need
    uncompressed, at most the upload cap."""
    return min(settings.max_upload_bytes, 4 * width * height + RESULT_SLACK_BYTES)


def check_result_size(size: int, cap: int, field: str) -> None:
    if size > cap:
        raise HordeError(400, "UploadTooLarge",
                         f"{field}: the result is {size} bytes; this job's may be at most {cap}")


def check_image_result(data: bytes, sizes: set[tuple[int, int]], cap: int, field: str) -> None:
    """Refuse (400 InvalidResult, naming `field`) anything that is not a WebP, PNG or JPEG of
    one of `sizes` within `cap` bytes."""
    check_result_size(len(data), cap, field)
    try:
        with Image.open(io.BytesIO(data), formats=RESULT_FORMATS) as image:
            found, size = image.format, image.size
    except (Image.UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
        raise HordeError(400, "InvalidResult",
                         f"{field}: not a WebP, PNG or JPEG image") from None
    if size not in sizes:
        wanted = " or ".join(f"{w}x{h}" for w, h in sorted(sizes))
        raise HordeError(400, "InvalidResult",
                         f"{field}: a {found} of {size[0]}x{size[1]}; this job makes {wanted}")
