"""Polyglot proof: a Node.js client built from proto/ alone runs all three tasks against a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from autopipeline_server.settings import Limits

from .conftest import make_settings
from .support import ServerThread

NODE_DIR = Path(__file__).resolve().parent / "node"
# Small enough that every 64x64 PNG arrives in several chunks, so reassembly is really exercised.
SMALL_CHUNK_BYTES = 2048


@pytest.fixture(scope="module")
def chunking_server(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    limits = Limits(max_num_images=8, image_chunk_bytes=SMALL_CHUNK_BYTES)
    running = ServerThread(make_settings(checkpoints, limits=limits))
    yield running
    running.stop()


def run_node_client(target: str) -> dict[str, Any]:
    node = shutil.which("node")
    assert node, "Node.js is required for the polyglot test (CI installs it)"
    assert (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        f"run `npm ci --prefix {NODE_DIR}` first (.ci/run does)"
    )
    result = subprocess.run(
        [node, str(NODE_DIR / "client.mjs"), target], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("inspect: server ")
    assert lines[-1].startswith("SUMMARY ")
    summary: dict[str, Any] = json.loads(lines[-1].removeprefix("SUMMARY "))
    return summary


def check_summary(summary: dict[str, Any]) -> list[int]:
    """Asserts every task produced the PNGs asked for; returns each image's chunk count."""
    assert {"sd15", "sdxl", "sd15-inpainting"} <= set(summary["models"])
    assert list(summary["tasks"]) == ["text-to-image", "image-to-image", "inpainting"]
    chunks = []
    for task, result in summary["tasks"].items():
        images = result["images"]
        assert [image["index"] for image in images] == ([0, 1] if task == "text-to-image" else [0])
        for image in images:
            assert (image["width"], image["height"]) == (64, 64)
            assert image["bytes"] > 0
            chunks.append(image["chunks"])
    return chunks


def test_node_client_with_default_settings(server: ServerThread) -> None:
    chunks = check_summary(run_node_client(server.target))
    assert chunks == [1, 1, 1, 1]


def test_node_client_reassembles_chunked_images(chunking_server: ServerThread) -> None:
    summary = run_node_client(chunking_server.target)
    chunks = check_summary(summary)
    assert all(count > 1 for count in chunks), chunks
    for result in summary["tasks"].values():
        for image in result["images"]:
            assert image["chunks"] == -(-image["bytes"] // SMALL_CHUNK_BYTES)
