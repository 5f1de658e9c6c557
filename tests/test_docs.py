"""The README follows the code: every setting and metric is documented, the
Python examples run against a real server, and CI runs the README's test command."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_settings_table():
    from lossd_server.config import Settings

    for name in Settings.model_fields:
        assert f"| `LOSSD_{name.upper()}` |" in README, f"README's settings table misses LOSSD_{name.upper()}"


def test_every_metric_is_in_the_metrics_table():
    from prometheus_client import CollectorRegistry

    from lossd_server.observability.metrics import Metrics

    metrics = Metrics(CollectorRegistry(), loss_names=["mse"], version="test", process_metrics=False)
    families = {m.name for m in metrics.registry.collect()}
    for family in families:
        names = {family, f"{family}_total"}
        assert any(f"| `{n}` |" in README for n in names), f"README's metrics table misses {family}"


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    test_command = next(line for block in blocks for line in block.splitlines() if "make test" in line)
    assert test_command.strip() in (ROOT / ".ci" / "run").read_text()


# The training walk-through trains for minutes; tests/server/training runs the same calls on tiny jobs.
# The deploy section's TLS client runs in tests/deploy/test_readme_deploy.py, against a TLS server.
PYTHON_BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S)
                 if "lossd.Client(" in b and "create_job" not in b and "lossd.TLS(" not in b]


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_examples_run(index, address):
    code = PYTHON_BLOCKS[index].replace('"localhost:50051"', repr(address))
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "readme"})
