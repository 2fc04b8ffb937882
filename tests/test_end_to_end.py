"""End to end as an operator and a user would run it: separate server and CLI processes, then SIGTERM."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import PIL.Image
import pytest

from autopipeline.v1 import autopipeline_pb2 as pb
from autopipeline.v1 import autopipeline_pb2_grpc as pb_grpc

BIN = Path(sys.executable).parent
GRACE = 600  # seconds: drain waits for in-flight work up to this long, however busy the machine


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def served(checkpoints: dict[str, Path], tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [
            str(BIN / "autopipeline-server"),
            "serve",
            "--model",
            f"tiny={checkpoints['sd15']}",
            "--model",
            f"xl={checkpoints['sdxl']}",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--grace",
            str(GRACE),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "listening on" in line, (tmp_path / "server.log").read_text()
        target = line.strip().rsplit(" ", 1)[-1]
        deadline = time.monotonic() + 120
        while run(str(BIN / "autopipeline-server"), "health", "--target", target).returncode != 0:
            assert time.monotonic() < deadline, "the server never became SERVING"
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        yield process, target
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        assert process.stdout is not None
        process.stdout.close()
        log.close()


def test_cli_against_a_separate_server_then_graceful_shutdown(
    served: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    process, target = served
    cli = str(BIN / "autopipeline")

    inspected = run(cli, "--target", target, "inspect", "--json")
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert [m["name"] for m in info["models"]] == ["tiny", "xl"]

    table = run(cli, "--target", target, "inspect")
    assert table.returncode == 0 and "StableDiffusionXLImg2ImgPipeline" in table.stdout

    out = tmp_path / "t2i.png"
    generated = run(cli, "--target", target, "generate", "--task", "text-to-image", "--prompt", "a fox",
                    "--seed", "3", "--steps", "3", "-o", str(out))  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert str(out) in generated.stdout
    with PIL.Image.open(out) as image:
        assert image.size == (64, 64)

    mask = tmp_path / "mask.png"
    PIL.Image.new("L", (64, 64), 255).save(mask)
    outdir = tmp_path / "inpainted"
    inpainted = run(cli, "--target", target, "generate", "--task", "inpainting", "--model", "xl", "--prompt",
                    "x",
                    "--image", str(out), "--mask", str(mask), "--steps", "4", "--num-images", "2",
                    "--format", "jpeg", "-o", str(outdir))  # fmt: skip
    assert inpainted.returncode == 0, inpainted.stderr
    assert len(list(outdir.glob("*.jpg"))) == 2

    bad = run(
        cli, "--target", target, "generate", "--task", "text-to-image", "--prompt", "x", "--width", "65"
    )
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT" in bad.stderr and "width" in bad.stderr

    # SIGTERM with a request in flight: it completes, the process exits 0. The request is sized from
    # the step time measured just now, to run for several seconds whatever the machine's speed; the
    # grace period is far longer than that.
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.AutoPipelineServiceStub(channel)
        request = pb.GenerateRequest(task=pb.TASK_TEXT_TO_IMAGE, prompt="measure", num_inference_steps=10)
        progress = [e.progress for e in stub.Generate(request) if e.HasField("progress")]
        step_seconds = progress[-1].elapsed.ToNanoseconds() / 1e9 / len(progress)
        steps = min(500, max(20, math.ceil(3.0 / step_seconds)))
        slow = subprocess.Popen(
            [cli, "--target", target, "generate", "--task", "text-to-image", "--prompt", "slow",
             "--steps", str(steps), "-o", str(tmp_path / "slow.png")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while stub.Inspect(pb.InspectRequest()).server.running == 0:
            assert time.monotonic() < deadline and slow.poll() is None, "the slow request never started"
            time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, slow_stderr = slow.communicate(timeout=GRACE + 60)
    assert slow.returncode == 0, slow_stderr
    assert process.wait(60) == 0
    assert (tmp_path / "slow.png").exists()
    server_log = (tmp_path / "server.log").read_text()
    # The last request to complete, the slow one, completed after draining began.
    assert server_log.index("shutting down") < server_log.rindex(" OK: "), "not in flight at SIGTERM"
    after = run(cli, "--target", target, "--timeout", "5", "inspect")
    assert after.returncode == 1


def test_demo_runs_offline(tmp_path: Path) -> None:
    result = run(str(BIN / "autopipeline-server"), "demo", "--out", str(tmp_path / "demo"), timeout=300)
    assert result.returncode == 0, result.stderr
    for task in ("text-to-image", "image-to-image", "inpainting"):
        assert f"{task}:" in result.stdout
        with PIL.Image.open(tmp_path / "demo" / f"{task}.png") as image:
            assert image.size == (64, 64)


def test_serve_refuses_a_missing_local_model_at_once(tmp_path: Path) -> None:
    """A mistyped path is not tried as a hub id: serve exits with the reason instead of idling."""
    result = run(str(BIN / "autopipeline-server"), "serve", "--model", "x=./no-such-dir", "--port", "0")
    assert result.returncode == 2
    assert "'./no-such-dir' is neither an existing checkpoint directory nor a hub id" in result.stderr
