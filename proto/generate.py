"""Generates the Python gRPC stubs of one proto package into a folder.

Usage: python proto/generate.py OUT_DIR [PACKAGE]

PACKAGE is a folder under proto/: ``lossd/v1`` (the default: the lossd.v1
API, written to client/lossd/v1) or ``lossd_server/grpc/oip`` (the Open
Inference Protocol's service, written to server/lossd_server/grpc/oip).
``make proto`` writes both.

The stubs are committed so that ``pip install lossd`` needs no protoc; the
test suite regenerates them into a temporary folder and fails when the
committed copy differs.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
PACKAGES = {
    "lossd/v1": '''"""Generated gRPC stubs for the ``lossd.v1`` API. Do not edit: run ``make proto``."""
''',
    "lossd_server/grpc/oip": '''"""Generated gRPC stubs for the Open Inference Protocol's ``inference`` service. Do not
edit: run ``make proto``."""
''',
}


def _include_dirs() -> list[str]:
    import google.rpc  # googleapis-common-protos ships status.proto beside its modules
    import grpc_tools

    rpc_root = pathlib.Path(google.rpc.__path__[0]).parent.parent
    return [str(PROTO_ROOT), str(pathlib.Path(grpc_tools.__file__).parent / "_proto"), str(rpc_root)]


def generate(out_dir: pathlib.Path, package: str = "lossd/v1") -> list[pathlib.Path]:
    """Writes the stubs of ``package`` (and ``__init__.py``) into ``out_dir``; returns the files."""
    if package not in PACKAGES:
        raise SystemExit(f"unknown package {package!r}: expected one of {', '.join(PACKAGES)}")
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / package).glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "grpc_tools.protoc", *(f"-I{d}" for d in _include_dirs())]
        args += [f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos]
        # In a subprocess: protoc's in-process entry point crashes in a process
        # that has already loaded TensorFlow (both bundle protobuf's C++ runtime).
        result = subprocess.run(args, cwd=PROTO_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"protoc failed:\n{result.stderr}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for old in out_dir.glob("*_pb2*.py*"):
            old.unlink()
        written = []
        for src in sorted((pathlib.Path(tmp) / package).iterdir()):
            dest = out_dir / src.name
            shutil.copyfile(src, dest)
            written.append(dest)
    init = out_dir / "__init__.py"
    init.write_text(PACKAGES[package])
    return [init, *written]


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    for path in generate(pathlib.Path(sys.argv[1]), *sys.argv[2:]):
        print(path)
