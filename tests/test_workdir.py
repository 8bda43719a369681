"""Tests for bacon_jax.workdir: the run directory's lock and the rewinding of JSON-lines logs."""

import json
import os
import socket
import subprocess
import sys

import pytest

from bacon_jax import errors, workdir


def _write_lock(directory, **holder):
    record = {"pid": os.getppid(), "host": socket.gethostname(), "started": "2025-01-01T00:00:00",
              "command": "python experiments/run.py --workdir=x", **holder}
    (directory / workdir.LOCK_NAME).write_text(json.dumps(record))
    return record


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_names_its_holder_and_is_released(tmp_path):
    run_dir = tmp_path / "run"
    with workdir.locked(str(run_dir)):
        holder = json.loads((run_dir / workdir.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"] == " ".join(sys.argv) and holder["started"]
    assert not (run_dir / workdir.LOCK_NAME).exists()
    with pytest.raises(RuntimeError):  # released however the block ends
        with workdir.locked(str(run_dir)):
            raise RuntimeError
    assert not (run_dir / workdir.LOCK_NAME).exists()


def test_a_live_holder_is_refused_by_name(tmp_path):
    record = _write_lock(tmp_path)
    with pytest.raises(errors.UserError) as err:
        with workdir.locked(str(tmp_path)):
            pass
    message = str(err.value)
    assert f"in use by process {os.getppid()} on {socket.gethostname()} since " \
           "2025-01-01T00:00:00 ('python experiments/run.py --workdir=x')" in message
    assert "another --workdir" in message
    assert json.loads((tmp_path / workdir.LOCK_NAME).read_text()) == record  # left alone


def test_a_crashed_holder_is_taken_over(tmp_path, caplog):
    _write_lock(tmp_path, pid=_dead_pid())
    with workdir.locked(str(tmp_path)):
        assert json.loads((tmp_path / workdir.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "is no longer running" in caplog.text
    assert not (tmp_path / workdir.LOCK_NAME).exists()


def test_a_holder_on_another_host_is_refused_with_how_to_remove_it(tmp_path):
    _write_lock(tmp_path, host="other-host", pid=_dead_pid())
    with pytest.raises(errors.UserError) as err:
        workdir.acquire(str(tmp_path))
    assert "on other-host" in str(err.value)
    assert f"remove {tmp_path / workdir.LOCK_NAME} and rerun" in str(err.value)


def test_truncate_jsonl_keeps_rows_before_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"iteration": it, "loss": float(it)} for it in (0, 1, 2, 3, 2)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert workdir.truncate_jsonl(str(path), 2) == rows[:2]
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    assert workdir.truncate_jsonl(str(tmp_path / "missing.jsonl"), 2) == []
