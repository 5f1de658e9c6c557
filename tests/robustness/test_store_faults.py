"""Issue 23: state that is bad never stops the server. Real servers over real
SQLite files that a test damaged the way a hand, a bug or a newer lossd
would; each case made `lossd serve` exit 1 on every start before.

- A dataset row whose info is ``{}`` (``KeyError: 'name'``), not JSON or of
  the wrong shape: quarantined, the rest served.
- A dropped table: made again, empty; a table that lost a column: the file
  moves to the quarantine whole and a fresh one serves.
- A directory where the database file should be: moved to the quarantine.
- A ``schema_version`` newer than the code: ``lossd serve`` exits 2 with a
  clear message and leaves the file as it was.
- An event with a garbage payload written while the server runs: WatchJob
  skips it with a warning and sends the others.
- Random values in every column of every table (hypothesis): the store
  opens (quarantining) and every read, and the servicer's conversion of
  what it reads, succeeds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from test_state_faults import (DB, QUARANTINE, _address, _assert_degraded, _assert_serves_evaluation,
                               _cancelled_jobs, _sha, serve)  # noqa: F401 - serve is a fixture

import lossd

DATASET_INFO = {"name": "mine", "source": "upload", "examples": 4, "image_shape": [8, 8, 1],
                "class_names": ["a", "b"], "create_time": 1.0, "size_bytes": 10, "path": "datasets/mine.npz",
                "owner": ""}


def _sql(data_dir: pathlib.Path, *statements, args=()) -> None:
    with contextlib.closing(sqlite3.connect(data_dir / DB)) as db, db:
        for statement in statements:
            db.execute(statement, args)


def test_the_dataset_fields_the_store_checks_are_datasetinfo_s():
    from lossd_server.training.datasets import DatasetInfo
    from lossd_server.state.schema import DATASET_FIELDS

    assert set(DATASET_FIELDS) == {f.name for f in dataclasses.fields(DatasetInfo)}
    DatasetInfo.from_dict(DATASET_INFO)  # the good row below is one DatasetInfo reads


@pytest.mark.parametrize("info", ["{}", "not json", "[1, 2]", json.dumps({**DATASET_INFO, "examples": "four"}),
                                  json.dumps({**DATASET_INFO, "name": "other"}),
                                  json.dumps({**DATASET_INFO, "image_shape": [8, 8]}),
                                  json.dumps({**DATASET_INFO, "surprise": 1})],
                         ids=["empty-object", "not-json", "a-list", "wrong-type", "other-name", "bad-shape",
                              "unknown-field"])
def test_a_malformed_dataset_row_is_quarantined_and_the_server_serves(tmp_path, serve, info):
    serve(tmp_path).stop(0)
    _sql(tmp_path, "INSERT INTO datasets (name, info, create_time, owner) VALUES ('mine', ?, 1, '')", args=(info,))
    again = serve(tmp_path)
    [moved] = _assert_degraded(again, 1)
    assert json.loads(moved.read_text())["row"]["info"] == info
    with lossd.Client(_address(again), timeout=60) as client:
        assert "mine" not in {d.name for d in client.list_datasets()}


@pytest.mark.parametrize("table", ["losses", "datasets", "events", "jobs", "versions"])
def test_a_dropped_table_is_made_again_and_the_server_serves(tmp_path, serve, table, caplog):
    srv = serve(tmp_path, max_concurrent_jobs=1)
    kept = _cancelled_jobs(srv, 1)
    with lossd.Client(_address(srv), timeout=60) as client:
        client.register_loss("kept", "mean(square(y_true - y_pred), axis=-1)")
    srv.stop(0)
    _sql(tmp_path, f"DROP TABLE {table}")
    with caplog.at_level(logging.WARNING, logger="lossd_server.state.quarantine"):
        again = serve(tmp_path, max_concurrent_jobs=1)
    assert f"the table {table} was missing; made again, empty" in caplog.text
    _assert_serves_evaluation(again)
    with lossd.Client(_address(again), timeout=60) as client:
        client.register_loss("after", "mean(abs(y_true - y_pred), axis=-1)")
        assert {j.id for j in client.list_jobs()} == (set() if table == "jobs" else set(kept))
        names = {i.name for i in client.losses() if i.source == "expression"}
        assert names == ({"after"} if table == "losses" else {"kept", "after"})


def test_a_table_that_lost_a_column_moves_the_file_to_the_quarantine(tmp_path, serve):
    serve(tmp_path).stop(0)
    _sql(tmp_path, "ALTER TABLE datasets DROP COLUMN owner")
    again = serve(tmp_path)
    items = _assert_degraded(again, 1)
    assert [p for p in items if p.name.endswith(DB)]
    with lossd.Client(_address(again), timeout=60) as client:
        client.register_loss("after", "mean(abs(y_true - y_pred), axis=-1)")  # the fresh file takes writes


def test_a_directory_at_the_database_path_is_moved_aside(tmp_path, serve):
    (tmp_path / DB).mkdir(parents=True)
    (tmp_path / DB / "stray").write_text("x")
    srv = serve(tmp_path)
    [moved] = _assert_degraded(srv, 1)
    assert (moved / "stray").read_text() == "x"
    assert (tmp_path / DB).is_file()


def test_a_database_newer_than_the_code_is_refused_with_exit_2(tmp_path, serve):
    serve(tmp_path).stop(0)
    _sql(tmp_path, "INSERT INTO schema_version (version) VALUES (999)")
    digest = _sha(tmp_path / DB)
    done = subprocess.run([str(pathlib.Path(sys.executable).with_name("lossd")), "serve", "--port", "0",
                           "--metrics-port", "off", "--data-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "the database has schema version 999, newer than this lossd's" in done.stderr
    assert "Traceback" not in done.stderr
    assert _sha(tmp_path / DB) == digest and not (tmp_path / QUARANTINE).exists()


def test_watchjob_skips_an_unreadable_event_with_a_warning(tmp_path, serve, caplog):
    srv = serve(tmp_path, max_concurrent_jobs=1)
    [ident] = _cancelled_jobs(srv, 1)
    with contextlib.closing(sqlite3.connect(tmp_path / DB)) as db, db:
        top = db.execute("SELECT MAX(seq) FROM events WHERE job_id = ?", (ident,)).fetchone()[0]
        db.execute("INSERT INTO events (job_id, seq, time, kind, payload) VALUES (?, ?, 1, 'message', ?)",
                   (ident, top + 1, "garbage{"))
        db.execute("INSERT INTO events (job_id, seq, time, kind, payload) VALUES (?, ?, 1, 'state', '[]')",
                   (ident, top + 2))
        db.execute("INSERT INTO events (job_id, seq, time, kind, payload) VALUES (?, ?, 1, 'message', ?)",
                   (ident, top + 3, json.dumps({"text": "after the garbage"})))
    with caplog.at_level(logging.WARNING), lossd.Client(_address(srv), timeout=60) as client:
        events = list(client.watch(ident))
    assert [e.sequence for e in events][-1] == top + 3
    assert top + 1 not in {e.sequence for e in events} and top + 2 not in {e.sequence for e in events}
    assert events[-1].message == "after the garbage"
    assert f"skips event {top + 1} of job {ident}" in caplog.text


# -- random values in every column --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    """A database a real server wrote: jobs with events, a dataset, losses."""
    from tests.servers import lossd_servers

    folder = tmp_path_factory.mktemp("populated")
    with lossd_servers(tmp_path_factory) as start:
        srv = start(data_dir=folder, max_concurrent_jobs=1)
        _cancelled_jobs(srv, 2)
        with lossd.Client(_address(srv), timeout=60) as client:
            client.register_loss("kept", "mean(square(y_true - y_pred), axis=-1)")
        srv.stop(0)
    _sql(folder, "INSERT INTO datasets (name, info, create_time, owner) VALUES ('mine', ?, 1, '')",
         args=(json.dumps(DATASET_INFO),))
    return folder / DB


def _columns() -> list[tuple[str, str]]:
    from lossd_server.state.schema import reference_columns

    return sorted((t, c) for t, cols in reference_columns().items() for c in cols) + [("schema_version", "version")]


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(allow_nan=True),
                   st.text(max_size=40), st.binary(max_size=40),
                   st.sampled_from(["{}", "[]", "null", "{\"state\": 7}", "{\"name\": 3}", "garbage{", "1e999",
                                    "queued", "running", "\"x\""]))


def _read_everything(path: pathlib.Path, quarantine: pathlib.Path) -> None:
    """Opens the store as the server does and reads, and converts, all it holds."""
    from lossd_server.grpc import training_servicer
    from lossd_server.training import jobs
    from lossd_server.state.quarantine import Quarantine
    from lossd_server.state.sqlite import SqliteStore

    store = SqliteStore(path, check_job=jobs.check_record, quarantine=Quarantine(quarantine))
    try:
        for job in store.list_jobs(page_size=1000)[0]:
            training_servicer.job_to_proto(store.get_job(job.id))
            for event in store.events(job.id):
                training_servicer._readable_event(event)
        store.counts_by_state()
        store.jobs_in_states(["queued", "running"])
        for info in store.list_datasets():
            store.get_dataset(info["name"])
        store.dataset_bytes()
        store.losses()
        store.count_losses()
        store.look()
        assert store.schema_version() >= 1
    finally:
        store.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(column=st.sampled_from(_columns()), value=VALUES, every_row=st.booleans())
def test_random_values_in_any_column_never_stop_the_store(populated, tmp_path_factory, column, value, every_row):
    folder = tmp_path_factory.mktemp("random")
    shutil.copy(populated, folder / DB)
    table, name = column
    with contextlib.closing(sqlite3.connect(folder / DB)) as db:
        rowid = db.execute(f"SELECT MIN(rowid) FROM {table}").fetchone()[0]
        try:
            with db:
                db.execute(f"UPDATE {table} SET {name} = ?" + ("" if every_row else " WHERE rowid = ?"),
                           (value,) if every_row else (value, rowid))
        except sqlite3.IntegrityError:  # NOT NULL or UNIQUE: SQLite itself keeps such a value out
            pass
    from lossd_server.config import StartupError
    from lossd_server.state.schema import NEWEST_SCHEMA

    if table == "schema_version" and isinstance(value, int) and not isinstance(value, bool) \
            and value > NEWEST_SCHEMA:
        with pytest.raises(StartupError, match=f"schema version {value}, newer than"):  # refused, not used
            _read_everything(folder / DB, folder / QUARANTINE)
        return
    _read_everything(folder / DB, folder / QUARANTINE)
    _read_everything(folder / DB, folder / QUARANTINE)  # and again, as after a second restart
