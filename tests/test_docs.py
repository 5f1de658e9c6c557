"""The README and the reference pages in docs/ follow the code: every setting
is in docs/settings.md's table and every metric in docs/metrics.md's, the
Python examples run against a real server, and CI runs the README's test
command."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
SETTINGS_PAGE = (DOCS / "settings.md").read_text()
METRICS_PAGE = (DOCS / "metrics.md").read_text()


def test_every_setting_is_in_the_settings_table():
    from lossd_server.config import Settings

    for name in Settings.model_fields:
        assert f"| `LOSSD_{name.upper()}` |" in SETTINGS_PAGE, \
            f"docs/settings.md's settings table misses LOSSD_{name.upper()}"


def test_every_metric_is_in_the_metrics_table():
    from prometheus_client import CollectorRegistry

    from lossd_server.observability.metrics import Metrics

    metrics = Metrics(CollectorRegistry(), loss_names=["mse"], version="test", process_metrics=False)
    families = {m.name for m in metrics.registry.collect()}
    for family in families:
        names = {family, f"{family}_total"}
        assert any(f"| `{n}` |" in METRICS_PAGE for n in names), f"docs/metrics.md's metrics table misses {family}"


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    test_command = next(line for block in blocks for line in block.splitlines() if "make test" in line)
    assert test_command.strip() in (ROOT / ".ci" / "run").read_text()


def test_every_page_in_docs_is_in_the_index_and_every_link_resolves():
    """docs/README.md lists every page, and no relative link of the README or
    of a page points at a file that is not there (a page moved or renamed)."""
    index = (DOCS / "README.md").read_text()
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")):
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links {target}, which is not there"


# The training walk-through trains for minutes; tests/server/training runs the same calls on tiny jobs.
# The deploy page's TLS client runs in tests/deploy/test_readme_deploy.py, against a TLS server;
# docs/scaling.md's sketch names a host that is not there.
EXAMPLE_PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
PYTHON_BLOCKS = [(page.relative_to(ROOT), block) for page in EXAMPLE_PAGES
                 for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
                 if 'lossd.Client("localhost:50051"' in block and "create_job" not in block]


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_examples_run(index, address):
    page, block = PYTHON_BLOCKS[index]
    code = block.replace('"localhost:50051"', repr(address))
    exec(compile(code, f"{page} python block {index}", "exec"), {"__name__": "readme"})


def test_every_example_that_registers_a_loss_runs_twice():
    """Running a README block again (the training walk-through, which no test
    runs whole) must not stop at ALREADY_EXISTS: every register_loss call in
    an example replaces."""
    calls = [call for page in EXAMPLE_PAGES for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
             for call in re.findall(r"register_loss\((.*?)\)\n", block, flags=re.S)]
    assert len(calls) >= 2
    for call in calls:
        assert "replace=True" in call, call
