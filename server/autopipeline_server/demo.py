"""The offline demo: build a tiny checkpoint, serve it on a free port, run all three tasks via the SDK."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from autopipeline import AsyncClient, Task
from autopipeline_server.server import create_server
from autopipeline_server.settings import ModelSpec, Settings
from autopipeline_server.tiny import build_tiny_checkpoint

log = logging.getLogger(__name__)


def _demo_inputs(size: int) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """A simple input picture and a mask whose white centre square is repainted."""
    image = PIL.Image.new("RGB", (size, size), (40, 90, 160))
    draw = PIL.ImageDraw.Draw(image)
    draw.ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(230, 180, 40))
    mask = PIL.Image.new("L", (size, size), 0)
    PIL.ImageDraw.Draw(mask).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=255)
    return image, mask


async def run_demo(out: Path, *, family: str = "sd15") -> int:
    """Writes one image per task under `out` and prints where; returns the exit status."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / f"tiny-{family}"
    if not (checkpoint / "model_index.json").exists():
        build_tiny_checkpoint(family, checkpoint, seed=0)
        print(f"built tiny {family} checkpoint in {checkpoint}")
    settings = Settings(models=(ModelSpec("tiny", str(checkpoint)),), host="127.0.0.1", port=0, device="cpu")
    running = await create_server(settings.validate())
    try:
        await running.wait_until_loaded()
        target = f"127.0.0.1:{running.port}"
        print(f"serving {checkpoint} as 'tiny' on {target}")
        image, mask = _demo_inputs(64)
        image.save(out / "input.png")
        mask.save(out / "mask.png")
        async with AsyncClient(target, timeout=120) as client:
            info = await client.inspect()
            for model in info.models:
                tasks = ", ".join(f"{t.task.value}={t.pipeline_class}" for t in model.tasks)
                print(f"model {model.name}: {model.family}, {model.state.value}; {tasks}")
            jobs: list[tuple[Task, dict[str, object]]] = [
                (Task.TEXT_TO_IMAGE, {}),
                (Task.IMAGE_TO_IMAGE, {"image": image, "strength": 0.6}),
                (Task.INPAINTING, {"image": image, "mask_image": mask}),
            ]
            for task, inputs in jobs:
                started = time.perf_counter()
                result = await client.generate(
                    "a lighthouse at dusk",
                    task=task,
                    seed=42,
                    num_inference_steps=8,
                    **inputs,  # type: ignore[arg-type]
                )
                first = result.outputs[0]
                path = out / f"{task.value}.png"
                first.save(path)
                print(
                    f"{task.value}: {result.started.pipeline_class}, {result.started.total_steps} steps, "
                    f"{first.width}x{first.height}, seed {first.seed}, "
                    f"{time.perf_counter() - started:.2f}s -> {path}"
                )
                log.debug("resolved parameters: %s", dataclasses.asdict(result.completed)["parameters"])
    finally:
        await running.stop(grace=5)
    print(f"done: images are in {out.resolve()}")
    return 0
