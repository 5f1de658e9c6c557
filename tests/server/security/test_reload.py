"""``security.reload.Reloader``, the one reloader of the gRPC port's and the
metrics endpoint's certificates, the basic-auth users and the tokens file,
on real files: a change is loaded once, a bad file keeps the previous value
and is not retried until it changes again, ``reload()`` (SIGHUP) loads an
unchanged file, and a check made while another thread reloads need not wait."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from lossd_server.security.reload import Reloader


def _replace(path, text: str) -> None:
    """Writes ``text`` to ``path`` by an atomic replace, as Kubernetes and
    ``lossd tokens revoke`` do (a new inode, so the change is seen at once)."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)


@pytest.fixture
def counted(tmp_path):
    path = tmp_path / "number"
    path.write_text("1")
    calls = []

    def load() -> int:
        calls.append(path.read_text())
        return int(path.read_text())  # ValueError for a bad file

    return path, calls, load


def test_a_change_is_loaded_once_and_a_bad_file_keeps_the_previous_value(counted, caplog):
    path, calls, load = counted
    reloader = Reloader([path], load, what="number file", errors=(ValueError,))
    assert reloader.value == 1 and reloader.loads == 1
    assert reloader.refresh() is None and len(calls) == 1  # unchanged: not read again
    _replace(path, "22")
    assert reloader.refresh() == 22 and reloader.current() == 22 and reloader.loads == 2 and len(calls) == 2
    with caplog.at_level(logging.INFO, logger="lossd_server.security.reload"):
        _replace(path, "not a number")
        assert reloader.refresh() is None and reloader.value == 22 and reloader.loads == 2
        assert reloader.refresh() is None and len(calls) == 3  # not retried until the file changes again
    assert any(r.levelno == logging.ERROR and "number file not reloaded, the previous one stays" in r.getMessage()
               for r in caplog.records), caplog.text
    _replace(path, "3")
    assert reloader.current() == 3 and reloader.loads == 3


def test_reload_loads_an_unchanged_file_and_every_spaces_the_checks(counted):
    path, calls, load = counted
    reloader = Reloader([path], load, what="number file", errors=(ValueError,), every=3600)
    _replace(path, "8")
    assert reloader.refresh() is None and len(calls) == 1  # not looked at for an hour
    reloader.reload()
    assert reloader.refresh() == 8 and reloader.loads == 2
    stamp = path.stat()
    path.write_text("9")  # the same size, and the times set back: the stamp cannot tell
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    reloader.reload()  # SIGHUP
    assert reloader.refresh() == 9 and reloader.loads == 3


def test_a_missing_file_is_no_change_and_at_start_the_load_says_what_is_missing(counted, tmp_path):
    path, calls, load = counted
    reloader = Reloader([path], load, what="number file", errors=(ValueError,))
    path.unlink()  # being replaced
    assert reloader.refresh() is None and reloader.value == 1
    path.write_text("5")
    assert reloader.refresh() == 5
    with pytest.raises(FileNotFoundError, match="absent"):
        Reloader([tmp_path / "absent"], lambda: (tmp_path / "absent").read_text(), what="x", errors=(ValueError,))


def test_a_check_that_need_not_wait_keeps_the_current_value_while_another_thread_reloads(counted):
    path, _, _ = counted
    entered, release = threading.Event(), threading.Event()
    slow = []

    def load() -> int:
        if slow:
            entered.set()
            release.wait(10)
        return int(path.read_text())

    reloader = Reloader([path], load, what="number file", errors=(ValueError,))
    slow.append(True)
    _replace(path, "9")
    worker = threading.Thread(target=reloader.refresh)
    worker.start()
    try:
        assert entered.wait(10)
        assert reloader.current(wait=False) == 1  # answered at once, with the value loaded before
    finally:
        release.set()
        worker.join(10)
    assert reloader.value == 9
