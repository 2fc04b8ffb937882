"""Shared fixtures: tiny checkpoints built once per session and a real gRPC server on localhost:0."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import PIL.Image
import pytest

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc
from autopipeline_server.settings import Limits, ModelSpec, Settings
from autopipeline_server.tiny import build_tiny_checkpoint

from .support import Generate, ServerThread, png_bytes


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    built = {family: build_tiny_checkpoint(family, root / family, seed=0) for family in ("sd15", "sdxl")}
    built["sd15-inpainting"] = build_tiny_checkpoint("sd15-inpainting", root / "sd15-inpainting", seed=0)
    # A real diffusers pipeline class that AutoPipeline has no mapping for.
    unsupported = root / "ddpm"
    unsupported.mkdir()
    (unsupported / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DDPMPipeline",
                "_diffusers_version": "0.42.1",
                "unet": ["diffusers", "UNet2DModel"],
            }
        )
    )
    built["ddpm"] = unsupported
    return built


def make_settings(checkpoints: dict[str, Path], **overrides: Any) -> Settings:
    models = (
        ModelSpec("sd15", str(checkpoints["sd15"])),
        ModelSpec("sdxl", str(checkpoints["sdxl"])),
        ModelSpec("sd15-inpainting", str(checkpoints["sd15-inpainting"])),
        ModelSpec("ddpm", str(checkpoints["ddpm"])),
    )
    base: dict[str, Any] = {"models": models, "host": "127.0.0.1", "port": 0, "device": "cpu", "grace": 5.0}
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="session")
def server(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    running = ServerThread(make_settings(checkpoints, limits=Limits(max_num_images=8)))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def small_chunks(checkpoints: dict[str, Path]) -> Iterator[ServerThread]:
    """A server that splits every image into 2 KiB chunks, so 64x64 images exercise reassembly."""
    settings = Settings(
        models=(ModelSpec("sd15", str(checkpoints["sd15"])),),
        host="127.0.0.1",
        port=0,
        device="cpu",
        limits=Limits(image_chunk_bytes=2048),
    )
    running = ServerThread(settings)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.AutoPipelineServiceStub:
    """A client built from the proto alone, with gRPC's default settings (4 MiB receive limit)."""
    return pb_grpc.AutoPipelineServiceStub(channel)


@pytest.fixture(scope="session")
def input_png() -> bytes:
    image = PIL.Image.new("RGB", (64, 64), (30, 120, 200))
    image.paste((240, 200, 40), (16, 16, 48, 48))
    return png_bytes(image)


@pytest.fixture(scope="session")
def mask_png() -> bytes:
    mask = PIL.Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return png_bytes(mask)


@pytest.fixture
def generate(stub: pb_grpc.AutoPipelineServiceStub) -> Generate:
    """Runs Generate and returns every event; gRPC errors propagate as grpc.RpcError."""

    def run(**fields: Any) -> list[pb.GenerateResponse]:
        return list(stub.Generate(pb.GenerateRequest(**fields), timeout=60))

    return run
