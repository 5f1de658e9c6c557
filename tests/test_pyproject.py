"""pyproject.toml builds without setuptools' deprecation warnings: the license
is an SPDX expression (PEP 639), which the build requirements can read."""

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
