"""Image decoding (with a decompression-bomb guard), encoding and chunking for the wire."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

import PIL.Image
from PIL import UnidentifiedImageError

from autopipeline_server.errors import InvalidRequest

ACCEPTED_INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_QUALITY = 90
# zlib level for PNG; Pillow's default is 6. See Settings.png_compress_level for the measurements.
DEFAULT_PNG_COMPRESS_LEVEL = 1


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


def decode_image(data: bytes, *, field: str, max_pixels: int, mode: str | None = "RGB") -> PIL.Image.Image:
    """Decodes PNG/JPEG/WebP bytes into an image of `mode` (None: the file's own mode, alpha kept).

    The header is read first and the pixel count checked before any pixel data is decoded, so a
    small file that claims enormous dimensions costs nothing.
    """
    if not data:
        raise InvalidRequest.field(field, "is required for this task and must hold PNG, JPEG or WebP bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data), formats=ACCEPTED_INPUT_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidRequest.field(
                    field, f"is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
                )
            image.load()
    except InvalidRequest:
        raise
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as err:
        # Pillow's own guard fired on the header, before our pixel check could.
        raise InvalidRequest.field(field, f"declares more pixels than the limit of {max_pixels}") from err
    except UnidentifiedImageError as err:
        raise InvalidRequest.field(
            field, "cannot be decoded as PNG, JPEG or WebP", reason="INVALID_IMAGE"
        ) from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise InvalidRequest.field(field, f"is truncated or corrupt ({err})", reason="INVALID_IMAGE") from err
    if mode == "RGB" and image.mode in ("RGBA", "LA", "P"):
        # Composite transparency onto white rather than letting convert() drop alpha to black.
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image if mode is None else image.convert(mode)


def encode_image(
    image: PIL.Image.Image,
    fmt: OutputFormat,
    quality: int = DEFAULT_QUALITY,
    png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL,
) -> EncodedImage:
    """Encodes an image; `quality` applies to JPEG and WebP, `png_compress_level` (zlib 0-9) to PNG."""
    buffer = io.BytesIO()
    if fmt is OutputFormat.PNG:
        image.save(buffer, format="PNG", compress_level=png_compress_level)
    elif fmt is OutputFormat.JPEG:
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return EncodedImage(buffer.getvalue(), fmt.mime_type)


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    """Splits `data` into consecutive pieces of at most `size` bytes (one empty piece for no data)."""
    if not data:
        yield b""
        return
    for start in range(0, len(data), size):
        yield data[start : start + size]


def chunk_count(data: bytes, size: int) -> int:
    return max(1, -(-len(data) // size))
