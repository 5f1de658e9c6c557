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
