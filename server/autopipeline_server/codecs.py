"""Image decoding (with a decompression-bomb guard), encoding and chunking for the wire."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import imagecodecs
import numpy as np
import PIL.Image
import PIL.ImageOps
from PIL import UnidentifiedImageError

from autopipeline_server.errors import InvalidRequest

ACCEPTED_INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_QUALITY = 90
# zlib level for PNG; libpng's and Pillow's default is 6. See Settings.png_compress_level.
DEFAULT_PNG_COMPRESS_LEVEL = 1
# The fast levels filter every row with PNG's Sub filter and compress with zlib's run-length
# strategy, libpng's recipe for fast PNG: choosing a filter per row (libpng's and Pillow's adaptive
# filtering) is most of the time of a fast PNG. 512x512 on a 2-core CPU: noise 3.9-4.6 ms against 18.2-18.5
# ms adaptive, the same bytes; photo-like 4.4-4.5 ms against 10.2-10.3 ms, 3% more bytes. Slower levels keep
# libpng's adaptive filters, for the smallest files.
RLE_UP_TO_LEVEL = 3
# Image modes PNG stores as they are; others are converted to RGB(A) first.
_PNG_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I;16"})


class OutputFormat(Enum):
    """Encodings the server can return."""

    PNG = "PNG"
    JPEG = "JPEG"
    WEBP = "WEBP"

    @property
    def mime_type(self) -> str:
        return f"image/{self.value.lower()}"


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    mime_type: str


# EXIF orientations (5-8) that turn the stored image a quarter, swapping its width and height.
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_ORIENTATION_TAG = 0x0112


def open_image(data: bytes, *, field: str, max_pixels: int) -> PIL.Image.Image:
    """Reads only the header of PNG/JPEG/WebP bytes and checks the pixel count; decodes nothing.

    The result's pixels load in `load_image`; until then it costs the bytes it came from, so a
    request can be checked (and admitted or refused) before any pixel is decoded.
    """
    if not data:
        raise InvalidRequest.field(field, "is required for this task and must hold PNG, JPEG or WebP bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data), formats=ACCEPTED_INPUT_FORMATS)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as err:
        # Pillow's own guard fired on the header, before our pixel check could.
        raise InvalidRequest.field(field, f"declares more pixels than the limit of {max_pixels}") from err
    except UnidentifiedImageError as err:
        raise InvalidRequest.field(
            field, "cannot be decoded as PNG, JPEG or WebP", reason="INVALID_IMAGE"
        ) from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise InvalidRequest.field(field, f"is truncated or corrupt ({err})", reason="INVALID_IMAGE") from err
    width, height = image.size
    if width * height > max_pixels:
        raise InvalidRequest.field(
            field, f"is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    return image


def _orientation(image: PIL.Image.Image) -> int:
    """The EXIF orientation known from the header (1 = upright), without decoding any pixel.

    Pillow's `getexif()` decodes a whole PNG to look for an eXIf chunk after the pixels; here a
    PNG's orientation comes only from an eXIf chunk before them.
    """
    try:
        if image.format == "PNG":
            exif = image.info.get("exif")
            if not isinstance(exif, bytes):
                return 1
            parsed = PIL.Image.Exif()
            parsed.load(exif)
            return int(parsed.get(_ORIENTATION_TAG, 1))
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block: the image is used as stored, as viewers do
        return 1


def oriented_size(image: PIL.Image.Image) -> tuple[int, int]:
    """The size an opened image has once its EXIF orientation is applied (as `load_image` does)."""
    width, height = image.size
    return (height, width) if _orientation(image) in _TRANSPOSED_ORIENTATIONS else (width, height)


def load_image(image: PIL.Image.Image, *, field: str, mode: str | None = "RGB") -> PIL.Image.Image:
    """Decodes an image from `open_image` into `mode`, upright as its EXIF orientation says."""
    orientation = _orientation(image)  # before loading, as `oriented_size` saw it
    try:
        image.load()
        upright = image
        if orientation != 1:
            with contextlib.suppress(Exception):  # a malformed EXIF block: keep the image as stored
                upright = PIL.ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as err:
        raise InvalidRequest.field(field, f"is truncated or corrupt ({err})", reason="INVALID_IMAGE") from err
    if mode == "RGB" and upright.mode in ("RGBA", "LA", "P", "PA"):
        # Composite transparency onto white rather than letting convert() drop alpha to black.
        rgba = upright.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        result = PIL.Image.alpha_composite(background, rgba).convert("RGB")
    elif mode is None:
        return upright  # the file's own mode, alpha kept (the OpenAI door's masks)
    else:
        result = upright.convert(mode)
    # The opened image keeps its decoded pixels (and its source bytes) otherwise.
    image.close()
    return result


def decode_image(data: bytes, *, field: str, max_pixels: int, mode: str | None = "RGB") -> PIL.Image.Image:
    """Opens (checking the pixel count first) and decodes PNG/JPEG/WebP bytes into an image of `mode`.

    `mode` None keeps the file's own mode, alpha included.
    """
    return load_image(open_image(data, field=field, max_pixels=max_pixels), field=field, mode=mode)


def encode_image(
    image: PIL.Image.Image,
    fmt: OutputFormat,
    quality: int = DEFAULT_QUALITY,
    png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL,
) -> EncodedImage:
    """Encodes an image; `quality` applies to JPEG and WebP, `png_compress_level` (zlib 0-9) to PNG.

    PNG goes through libpng (imagecodecs) in one call that releases the GIL, where Pillow's encoder
    takes the GIL back for every 64 KiB it writes: beside a thread running Python (the device
    thread, driving a pipeline), each time waits out the interpreter's switch interval, and a 512x512
    PNG of noise took 91-121 ms instead of 18 (libpng here: 9-10 ms; `benchmarks/encoding.py`).
    """
    if fmt is OutputFormat.PNG:
        return EncodedImage(_png(image, png_compress_level), fmt.mime_type)
    buffer = io.BytesIO()
    if fmt is OutputFormat.JPEG:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return EncodedImage(buffer.getvalue(), fmt.mime_type)


def _png(image: PIL.Image.Image, level: int) -> bytes:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    options: dict[str, int] = {}  # levels 4-9: libpng's adaptive filters and default strategy
    if level == 0:  # stored: filtering only costs time
        options = {"filter": imagecodecs.PNG.FILTER.NONE}
    elif level <= RLE_UP_TO_LEVEL:
        options = {"filter": imagecodecs.PNG.FILTER.SUB, "strategy": imagecodecs.PNG.STRATEGY.RLE}
    return bytes(imagecodecs.png_encode(np.asarray(image), level=level, **options))


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    """Splits `data` into consecutive pieces of at most `size` bytes (one empty piece for no data)."""
    if not data:
        yield b""
        return
    for start in range(0, len(data), size):
        yield data[start : start + size]


def chunk_count(data: bytes, size: int) -> int:
    return max(1, -(-len(data) // size))
