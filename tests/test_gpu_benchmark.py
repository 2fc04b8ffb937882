"""benchmarks/gpu.py gets one unattended run on a GPU: its CPU smoke test must run every phase cleanly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Every phase, and the probes, which run only when named.
PHASES = "direct,eager,compiled-cold,compiled-warm,eager-batching,direct-compiled,call-path"
PROBES = "eager-prepared,precompile"


def test_the_gpu_benchmark_runs_every_phase_and_probe_on_a_cpu(tmp_path: Path) -> None:
    command = [
        sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--device", "cpu",
        "--families", "sd15", "--requests", "3", "--latency-seconds", "1", "--off-shape-requests", "2",
        "--clients", "1,2", "--window", "1", "--budget", "3000", "--keep", str(tmp_path),
        "--phases", f"{PHASES},{PROBES}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "client"), str(ROOT / "server")])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500, check=False, env=env)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "FAILED" not in out and "skipped" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("sd15 64x64")]
    rows = {re.split(r"\s{2,}", line)[1]: line for line in lines}
    assert set(rows) == {
        "direct eager",
        "direct compiled (batch 1)",
        "call path, compiled (batch 1, no gRPC)",
        "served eager [off]",
        "served eager, batching [off]",
        "served compiled, cold cache [compile]",
        "served compiled, warm cache [compile]",
        "served eager, prepared [eager]",
    }, out
    for name in (
        "served compiled, cold cache [compile]",
        "served compiled, warm cache [compile]",
        "served eager, prepared [eager]",
    ):
        # Compiled and prepared images match eager ones (float32 on a CPU: at most one 8-bit level apart).
        difference = re.search(r"max (\d+) mean", rows[name])
        assert difference is not None and int(difference.group(1)) <= 1, rows[name]
    # The warm start loaded the graphs the cold one precompiled, and its log says where its time went.
    assert re.search(r"loaded [1-9]\)", rows["served compiled, warm cache [compile]"]), out
    warm_start = r"served compiled, warm cache, its start: \+0\.0s listening on .*loaded m .*"
    assert re.search(warm_start + r"0 graphs traced and [1-9] precompiled ones loaded", out), out
    # The yardstick's profile: kernel time against wall time, and the table it names.
    assert re.search(r"direct compiled, one call profiled: [\d.]+ ms of kernels in [\d.]+ ms", out), out
    assert (tmp_path / "sd15-direct-compiled-profile.txt").read_text().strip(), out
    assert re.search(r"server call path, one call profiled: [\d.]+ ms of kernels in [\d.]+ ms", out), out
    assert "aten::" in (tmp_path / "sd15-call-path-profile.txt").read_text(), out
    # One call broken down in stages, in every in-process phase, and the undeclared size call by call.
    stage = r"one call in stages: wall [\d.]+ ms; text_encoder x2 host [\d.]+; denoiser x5 host [\d.]+;"
    for said in ("direct eager", "direct compiled", "server call path"):
        assert re.search(f"{said}, {stage}", out), out
    assert re.search(r"VAE decoder compiled too \([\d.]+ s\): p50 [\d.]+ ms; one call in stages", out), out
    for said in ("direct eager", "direct eager, denoiser prepared", "server call path"):
        assert re.search(f"{said}, undeclared size, calls in order: [\\d.]+, [\\d.]+ ms", out), out
    # The undeclared size: the first request and the median of the rest.
    assert re.search(r"\d+\.\d/\d+\.\d", rows["served eager [off]"]), rows["served eager [off]"]
    # Each served phase splits its p50 into the pipeline call and encoding (the server's own timings).
    assert len(re.findall(r"medians of the pipeline call [\d.]+ ms, encoding [\d.]+ ms", out)) == 5, out
    # The precompile probe: a precompiled UNet saved, then loaded and called in a fresh process.
    probe = re.search(r"precompiled ([\d.]+) after ([\d.]+) s to load", out)
    assert probe is not None and float(probe.group(1)) > 0, out
