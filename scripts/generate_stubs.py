"""Regenerates the committed Python stubs from proto/ (or, with --check, fails if they are stale)."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "client"
PACKAGE = Path("autopipeline") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    """mypy-protobuf's protoc plugin: beside this interpreter first, so an unactivated venv works."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found beside {sys.executable} or on PATH: pip install mypy-protobuf")
    return f"--plugin={name}={found}"


def generate(out_root: Path) -> list[Path]:
    """Runs protoc (grpcio-tools) with mypy-protobuf over every .proto; returns the files written."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        _plugin("protoc-gen-mypy"),
        _plugin("protoc-gen-mypy_grpc"),
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    subprocess.run(command, check=True, cwd=ROOT)
    return sorted(p for p in (out_root / PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def _same(fresh: Path, committed_dir: Path) -> bool:
    return filecmp.cmp(fresh, committed_dir / fresh.name, shallow=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs differ")
    args = parser.parse_args()
    committed_dir = OUT_ROOT / PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        committed = sorted(p for p in committed_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))
        if args.check:
            fresh_names = {p.name for p in fresh}
            stale = sorted(
                {p.name for p in committed} ^ fresh_names
                | {
                    p.name
                    for p in fresh
                    if p.name in {c.name for c in committed} and not _same(p, committed_dir)
                }
            )
            if stale:
                print(f"stale generated stubs: {', '.join(stale)}; run python scripts/generate_stubs.py")
                return 1
            print(f"{len(fresh)} generated files are up to date")
            return 0
        for path in committed:
            path.unlink()
        for path in fresh:
            shutil.copyfile(path, committed_dir / path.name)
            print(f"wrote {(committed_dir / path.name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
