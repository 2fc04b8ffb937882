"""PNG encoding: the server's encoder against Pillow's, alone and beside a thread running Python.

Usage: python benchmarks/encoding.py [--repeats 7] [--level 1]

Images are encoded on the event loop's threads while the device thread drives the next pipeline
call, which is Python most of the time (eager diffusers on a GPU is launch-bound). Pillow's PNG
encoder gives the GIL back and takes it again for every 64 KiB it writes, and each time waits for the
busy thread to let go of it (up to the interpreter's switch interval, 5 ms); the server's encoder
(libpng through imagecodecs, `codecs.encode_image`) writes the whole image in one call without the
GIL. Prints the median time and size of each, for noise (what random-weight checkpoints make: PNG's
worst case) and a photo-like image, at 512x512 and 1024x1024.
"""

from __future__ import annotations

import argparse
import functools
import io
import statistics
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import PIL.Image

from autopipeline_server.codecs import RLE_UP_TO_LEVEL, OutputFormat, encode_image


def images(side: int) -> dict[str, PIL.Image.Image]:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    y, x = np.mgrid[0:side, 0:side]
    grain = rng.normal(0, 3, (side, side))  # gradients, texture and sensor-like noise
    channels = [(x / 2 + 20 * np.sin(y / 17)) % 256, (y / 2) % 256, ((x + y) / 4 + grain) % 256]
    photo = np.stack(channels, axis=-1)
    return {
        f"noise {side}x{side}": PIL.Image.fromarray(noise),
        f"photo-like {side}x{side}": PIL.Image.fromarray(photo.astype(np.uint8)),
    }


def pillow(image: PIL.Image.Image, level: int) -> bytes:
    """Pillow's PNG encoder with the server's former settings (zlib's run-length strategy at levels 1-3)."""
    buffer = io.BytesIO()
    strategy = zlib.Z_RLE if 1 <= level <= RLE_UP_TO_LEVEL else zlib.Z_DEFAULT_STRATEGY
    image.save(buffer, format="PNG", compress_level=level, compress_type=strategy)
    return buffer.getvalue()


def server(image: PIL.Image.Image, level: int) -> bytes:
    return encode_image(image, OutputFormat.PNG, png_compress_level=level).data


@contextmanager
def busy_python_thread(on: bool) -> Iterator[None]:
    """A thread that runs Python all the time, as the device thread mostly does."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    thread = threading.Thread(target=spin, daemon=True)
    if on:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if on:
            thread.join()


def median_ms(encode: Callable[[], bytes], repeats: int) -> tuple[float, int]:
    size = len(encode())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        encode()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--level", type=int, default=1, help="zlib level, as --png-compress-level")
    args = parser.parse_args()
    print(f"PNG, zlib level {args.level}; median of {args.repeats}; ms (KB)")
    print(f"{'image':22s} {'beside':14s} {'Pillow':>16s} {'server':>16s} {'speed-up':>9s}")
    for side in (512, 1024):
        for name, image in images(side).items():
            for busy in (False, True):
                with busy_python_thread(busy):
                    slow, slow_size = median_ms(functools.partial(pillow, image, args.level), args.repeats)
                    fast, fast_size = median_ms(functools.partial(server, image, args.level), args.repeats)
                print(
                    f"{name:22s} {'busy Python' if busy else 'nothing':14s} "
                    f"{slow:7.1f} ({slow_size // 1000:5d}) "
                    f"{fast:7.1f} ({fast_size // 1000:5d}) {slow / fast:8.1f}x"
                )


if __name__ == "__main__":
    main()
