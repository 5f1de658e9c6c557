"""`lossd jobs ...` and `lossd datasets ...` against the test server; and the
client's training module imports without TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from lossd import cli
from digit_files import digits_uint8


def test_jobs_list_get_and_plot(training_address, cnn_job, tmp_path, capsys):
    assert cli.main(["jobs", "list", "--address", training_address, "--state", "succeeded"]) == 0
    assert cnn_job.name in capsys.readouterr().out
    assert cli.main(["jobs", "--address", training_address, "get", cnn_job.name]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["state"] == "succeeded" and got["spec"]["model"]["preset"] == "cnn"
    assert got["spec"]["seed"] == 1  # an int, not protobuf's JSON string "1"
    filters = got["spec"]["model"]["params"].get("filters", [])
    assert all(type(f) is int for f in filters), filters  # not 32.0, as a Struct holds it
    out = tmp_path / "loss.png"
    assert cli.main(["jobs", "plot", cnn_job.id, "--address", training_address, "-o", str(out)]) == 0
    from PIL import Image

    with Image.open(out) as image:
        assert image.format == "PNG" and image.width >= 400
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels != 255).any(axis=-1).mean() > 0.01  # curves and axes were drawn
    assert cli.main(["jobs", "download", cnn_job.name, "--address", training_address, "--artifact", "history",
                     "-o", str(tmp_path / "h.json")]) == 0
    assert len(json.loads((tmp_path / "h.json").read_text())["loss"]) == 2


def test_datasets_upload_and_list(training_address, tmp_path, capsys):
    x, y = digits_uint8(100)
    np.savez(tmp_path / "cli.npz", x=x, y=y)
    assert cli.main(["datasets", "upload", str(tmp_path / "cli.npz"), "--name", "from-cli",
                     "--address", training_address]) == 0
    assert "from-cli: 100 images of 8x8x1, 10 classes" in capsys.readouterr().out
    assert cli.main(["datasets", "list", "--address", training_address]) == 0
    out = capsys.readouterr().out
    assert "from-cli" in out and "digits" in out


def test_create_errors_are_printed(training_address, capsys):
    assert cli.main(["jobs", "create", "--model", "resnet", "--address", training_address]) == 1
    assert "UNKNOWN_MODEL" in capsys.readouterr().err


def test_training_client_imports_without_tensorflow():
    code = ("import sys\n"
            "for name in ('tensorflow', 'keras', 'PIL', 'matplotlib'):\n"
            "    sys.modules[name] = None  # any import of them fails\n"
            "import lossd, lossd._training, lossd._images, lossd._progress, lossd._cli_training\n"
            "assert hasattr(lossd.Client, 'create_job') and hasattr(lossd.Client, 'generate')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
