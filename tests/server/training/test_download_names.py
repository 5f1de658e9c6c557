"""What ``download(job, folder)`` writes, as the README says it: the
server's file names, one per job, so several jobs' artifacts share a folder."""

from __future__ import annotations

import json
import pathlib
import re

README = (pathlib.Path(__file__).resolve().parents[3] / "README.md").read_text()


def test_download_into_a_folder_names_files_by_job(tclient, cnn_job, tmp_path):
    history = tclient.download(cnn_job, tmp_path, artifact="history")
    model = tclient.download(cnn_job, tmp_path)
    logs = tclient.download(cnn_job, tmp_path, artifact="tensorboard")
    assert history == tmp_path / f"{cnn_job.id}-history.json"
    assert len(json.loads(history.read_text())["loss"]) == 2
    assert model == tmp_path / f"{cnn_job.id}.keras"
    assert logs == tmp_path / f"{cnn_job.id}-logs.tar.gz"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([history.name, model.name, logs.name])


def test_the_readme_names_the_history_file_as_written():
    line = next(line for line in README.splitlines() if 'artifact="history"' in line and "download(" in line)
    assert re.search(r"<id>-history\.json", line), line
    assert not re.search(r"#\s*history\.json", line), line


def test_the_cli_unpacks_tensorboard_logs_into_a_folder(training_address, cnn_job, tmp_path):
    # `-o tb` gives a folder for `tensorboard --logdir tb`; `-o logs.tar.gz` the archive as it comes.
    import subprocess
    import sys
    import tarfile

    lossd_cmd = str(pathlib.Path(sys.executable).with_name("lossd"))
    for output in ("tb", "logs.tar.gz"):
        done = subprocess.run([lossd_cmd, "jobs", "download", cnn_job.name, "--artifact", "tensorboard",
                               "-o", str(tmp_path / output), "--address", training_address],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(tmp_path / output)
    with tarfile.open(tmp_path / "logs.tar.gz") as tar:
        archived = sorted(m.name for m in tar.getmembers() if m.isfile())
    unpacked = sorted(str(p.relative_to(tmp_path / "tb")) for p in (tmp_path / "tb").rglob("*") if p.is_file())
    assert unpacked == archived and any("events.out.tfevents" in name for name in unpacked), (unpacked, archived)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "tb"]  # no archive left beside tb
