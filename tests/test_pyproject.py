"""pyproject.toml builds without setuptools' deprecation warnings (the license
is an SPDX expression, PEP 639, which the build requirements can read), and
its server extra brings every package the server imports."""

from __future__ import annotations

import pathlib
import re
import tomllib
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def test_license_is_an_spdx_expression_with_a_setuptools_that_reads_it():
    project = tomllib.loads(PYPROJECT.read_text())
    assert project["project"]["license"] == "Apache-2.0"
    requires = project["build-system"]["requires"]
    setuptools_pin = next(r for r in requires if r.startswith("setuptools"))
    minimum = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools_pin)
    assert minimum and int(minimum.group(1)) >= 77, f"SPDX license strings need setuptools>=77: {setuptools_pin}"


def test_setuptools_reads_the_metadata_without_a_deprecation_warning():
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), str(PYPROJECT))
    complaints = [str(w.message) for w in caught if "licen" in str(w.message).lower()]
    assert complaints == [], complaints
    if int(setuptools.__version__.split(".")[0]) >= 77:
        assert dist.metadata.license_expression == "Apache-2.0"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalized(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))


def test_every_package_the_server_imports_is_a_dependency_of_the_server_extra():
    """``pip install "lossd[server]"`` brings everything ``lossd_server`` imports
    (cryptography for ``lossd secrets init``, for one): each third-party import
    is a declared dependency, or one a declared dependency requires."""
    import ast
    import importlib.metadata as metadata
    import sys

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    declared = {_requirement_name(r) for r in project["dependencies"] + project["optional-dependencies"]["server"]}
    reachable = set(declared)
    for name in declared:
        try:
            reachable |= {_requirement_name(r) for r in metadata.requires(name) or () if "extra ==" not in r}
        except metadata.PackageNotFoundError:
            pass
    imported = set()
    for source in (ROOT / "server" / "lossd_server").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    imported -= set(sys.stdlib_module_names) | {"__future__", "lossd", "lossd_server"}
    distributions = metadata.packages_distributions()
    missing = {module: distributions.get(module) for module in sorted(imported)
               if not {_normalized(d) for d in distributions.get(module, [module])} & reachable}
    assert not missing, f"lossd_server imports these, which pyproject.toml's server extra does not bring: {missing}"
