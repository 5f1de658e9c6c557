"""The layers hold: TensorFlow is imported by the evaluation backend, the
training job process (worker, its multi-worker loop and the steps both share
in ``loop``) and the inference module only; the core imports no gRPC; the
training modules import each other one way, and only each other's public names.

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


def _sources(package: str):
    """``(module name, parsed source)`` of every module in ``package``."""
    import ast
    import importlib
    import pathlib

    folder = pathlib.Path(importlib.import_module(package).__file__).parent
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join((package, *parts)), ast.parse(path.read_text(encoding="utf-8"))


def _package_imports(package: str) -> set[tuple[str, str]]:
    """``(module, imported)`` for every absolute import in ``package``'s
    sources, those inside functions too."""
    import ast

    found = set()
    for module, tree in _sources(package):
        for node in ast.walk(tree):
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


def _imported_names(package: str):
    """``(module, imported module, name or None)`` for every import in
    ``package``'s sources, those inside functions too: ``from m import n``
    gives ``(…, "m", "n")``, ``import m`` gives ``(…, "m", None)``. Relative
    imports are resolved."""
    import ast

    for module, tree in _sources(package):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield module, alias.name, None
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative to the importing module's package
                    anchor = module.split(".")[:-node.level]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    yield module, base, alias.name


def _module_graph(package: str) -> dict[str, set[str]]:
    """Which modules of ``package`` each of its modules imports (at module
    level or inside functions; ``from package import module`` counts)."""
    modules = {module for module, _ in _sources(package)}
    graph = {module: set() for module in modules}
    for module, imported, name in _imported_names(package):
        for target in (f"{imported}.{name}" if name else None, imported):
            if target in modules:
                if target != module:
                    graph[module].add(target)
                break
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of ``graph`` as ``[a, b, ..., a]``, or ``[]`` where it has none."""
    done, path = set(), []

    def visit(node: str) -> list[str]:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return []
        path.append(node)
        for after in sorted(graph.get(node, ())):
            found = visit(after)
            if found:
                return found
        path.pop()
        done.add(node)
        return []

    for start in sorted(graph):
        found = visit(start)
        if found:
            return found
    return []


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_training_modules_import_each_other_in_no_circle():
    """The two training loops share ``training.loop``; neither imports the
    other's internals, and models, losses and the loops import one way
    (issue 24, item 5: models <-> worker <-> multiworker <-> losses were a circle)."""
    graph = _module_graph("lossd_server.training")
    # The walk does see imports: inside functions, and of the form ``from lossd_server.training import m``.
    assert "lossd_server.training.loop" in graph["lossd_server.training.models"]  # models.VAE.train_step's
    assert "lossd_server.training.multiworker" in graph["lossd_server.training.worker"]
    cycle = _cycle(graph)
    assert not cycle, "lossd_server.training modules import each other in a circle: " + " -> ".join(cycle)


def test_training_modules_import_no_private_name_of_another_module():
    """What one module shares with another is public: no ``from m import _x``
    and no ``m._x`` of an imported module ``m`` of lossd."""
    import ast

    wrong = []
    for module, imported, name in _imported_names("lossd_server.training"):
        private = [part for part in [*imported.split("."), name or ""] if part.startswith("_")
                   and not part.startswith("__")]
        if imported.startswith("lossd") and imported != module and private:
            wrong.append(f"{module}: from {imported} import {name}" if name else f"{module}: import {imported}")
    for module, tree in _sources("lossd_server.training"):
        modules = set()  # the local names bound to a module of lossd
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update((a.asname or a.name.split(".")[0]) for a in node.names if a.name.startswith("lossd"))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lossd"):
                modules.update(a.asname or a.name for a in node.names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                wrong.append(f"{module}: {node.value.id}.{node.attr}")
    assert not wrong, f"private names used across modules: {sorted(set(wrong))}"


def test_the_server_imports_no_private_module_of_the_client():
    """Issue 24, item 3: ``lossd``'s underscored modules are the client's own;
    what the server shares with it lives in public ones (``lossd.wire``,
    ``lossd.addresses``)."""
    wrong = [f"{module}: {imported}" + (f".{name}" if name else "")
             for module, imported, name in _imported_names("lossd_server")
             if imported.startswith("lossd._") or (imported == "lossd" and (name or "").startswith("_"))]
    assert not wrong, f"the server imports private client modules: {sorted(set(wrong))}"
