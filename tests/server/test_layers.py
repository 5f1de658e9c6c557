"""The layers hold: TensorFlow is imported by the evaluation backend, the
training job process (worker, its multi-worker loop and the steps both share
in ``loop``) and the inference module only; the core imports no gRPC.

Every module of lossd_server is imported in a fresh interpreter whose import
statements are watched (``builtins.__import__``), so an import of
``tensorflow`` or ``grpc`` by the wrong module is seen even when the package
is already loaded (Keras loads TensorFlow on its own, which is fine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

WATCH = textwrap.dedent('''
    import builtins, importlib, json, pkgutil, sys

    seen = []
    original = builtins.__import__

    def watching(name, globals=None, locals=None, fromlist=(), level=0):
        importer = (globals or {}).get("__name__", "")
        if level == 0 and importer.startswith("lossd_server"):
            top = name.split(".")[0]
            if top in ("tensorflow", "grpc", "grpc_status", "grpc_health", "grpc_reflection"):
                seen.append([importer, name])
        return original(name, globals, locals, fromlist, level)

    builtins.__import__ = watching
    import lossd_server
    modules = [m.name for m in pkgutil.walk_packages(lossd_server.__path__, "lossd_server.")]
    for name in modules:
        importlib.import_module(name)
    # Imports inside functions run when the function does: read the sources too.
    import ast
    for name in modules:
        module = sys.modules[name]
        with open(module.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for imported in names:
                if imported.split(".")[0] in ("tensorflow", "grpc", "grpc_status", "grpc_health",
                                              "grpc_reflection"):
                    seen.append([name, imported])
    print(json.dumps({"modules": modules, "imports": seen}))
''')

TENSORFLOW_OWNERS = {"lossd_server.evaluation.backend", "lossd_server.training.worker", "lossd_server.training.loop",
                     "lossd_server.training.multiworker", "lossd_server.training.inference"}


def _imports():
    done = subprocess.run([sys.executable, "-c", WATCH], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["modules"], {(importer, name) for importer, name in report["imports"]}


def test_tensorflow_and_grpc_are_imported_where_the_layers_say():
    modules, imports = _imports()
    assert "lossd_server.evaluation.backend" in modules and "lossd_server.losses.plan" in modules
    tensorflow = {importer for importer, name in imports if name.split(".")[0] == "tensorflow"}
    assert tensorflow <= TENSORFLOW_OWNERS, f"TensorFlow imported outside its owners: {tensorflow - TENSORFLOW_OWNERS}"
    assert "lossd_server.evaluation.backend" in tensorflow  # the watch does see imports
    grpc_users = {importer for importer, name in imports if name.split(".")[0] != "tensorflow"}
    outside = {m for m in grpc_users if not (m.startswith("lossd_server.grpc") or m == "lossd_server.app")}
    assert not outside, f"gRPC imported by the core: {outside}"


# Which packages of lossd_server each package must not import: shared state
# sits below both the losses and training, and losses below training;
# security is shared by the gRPC port and the metrics endpoint, below both.
FORBIDDEN = {"lossd_server.state": ("lossd_server.losses", "lossd_server.training", "lossd_server.evaluation",
                                    "lossd_server.grpc"),
             "lossd_server.losses": ("lossd_server.training",),
             "lossd_server.security": ("lossd_server.losses", "lossd_server.training", "lossd_server.evaluation",
                                       "lossd_server.grpc", "lossd_server.state", "lossd_server.observability")}


def _package_imports(package: str) -> set[tuple[str, str]]:
    """``(module, imported)`` for every absolute import in ``package``'s
    sources, those inside functions too."""
    import ast
    import importlib
    import pathlib

    folder = pathlib.Path(importlib.import_module(package).__file__).parent
    found = set()
    for path in sorted(folder.rglob("*.py")):
        module = ".".join((package, *path.relative_to(folder).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update((module, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add((module, node.module))
    return found


def test_state_losses_and_security_do_not_import_the_layers_above_them():
    for package, forbidden in FORBIDDEN.items():
        imports = _package_imports(package)
        assert any(name.startswith("lossd_server.") for _, name in imports), package  # the walk does see imports
        wrong = sorted((m, n) for m, n in imports if any(n == f or n.startswith(f + ".") for f in forbidden))
        assert not wrong, f"{package} imports a layer above it: {wrong}"
