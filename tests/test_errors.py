"""Tests for bacon_jax.errors: which exceptions end as one line, and the library log filter."""

import errno
import logging
import os

import pytest

from bacon_jax import errors


def _raise(error):
    def main(argv):
        del argv
        raise error

    return main


def _stderr_lines(capsys):
    return capsys.readouterr().err.strip().splitlines()


def test_user_error_is_one_line_and_status_1(capsys):
    main = errors.reporting_user_errors(_raise(errors.UserError("lr_img must be > 0,\n  got -1.")))
    with pytest.raises(SystemExit) as exit_:
        main(["run.py"])
    assert exit_.value.code == 1
    assert _stderr_lines(capsys) == ["ERROR: lr_img must be > 0, got -1."]


def test_ctrl_c_ends_with_the_resume_hint_and_status_130(capsys):
    hint = "Interrupted in experiment 0 at iteration 7 of 200; the latest checkpoint is ..."
    with pytest.raises(SystemExit) as exit_:
        errors.reporting_user_errors(_raise(errors.Interrupted(hint)))(["run.py"])
    assert exit_.value.code == 130 and _stderr_lines(capsys) == [f"ERROR: {hint}"]
    # Ctrl-C outside a distillation (loading data, compiling) still says how to resume.
    with pytest.raises(SystemExit) as exit_:
        errors.reporting_user_errors(_raise(KeyboardInterrupt()))(["run.py"])
    assert exit_.value.code == 130
    assert "Rerunning the same command resumes" in _stderr_lines(capsys)[0]


def _disk_full_in_a_chain():
    """ENOSPC as libraries surface it: wrapped, then buried under an error raised handling it."""
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/run/exp0/metrics.jsonl")
        except OSError as error:
            raise RuntimeError("checkpoint write failed") from error
    except RuntimeError:
        try:
            raise ImportError("cannot import name 'x' from partially initialized module")
        except ImportError as last:
            return last


def test_disk_full_is_found_anywhere_in_the_chain(capsys):
    error = _disk_full_in_a_chain()
    assert errors.disk_full_error(error).filename == "/tmp/run/exp0/metrics.jsonl"
    with pytest.raises(SystemExit) as exit_:
        errors.reporting_user_errors(_raise(error))(["run.py"])
    (line,) = _stderr_lines(capsys)
    assert exit_.value.code == 1
    assert line.startswith("ERROR: No space left on device while writing /tmp/run/exp0/metrics")
    assert "resumes from the latest checkpoint" in line
    # TensorStore reports it in its message only.
    assert errors.describe(ValueError("write failed: [errno 28] No space left on device")) \
        is not None


def test_bugs_keep_their_traceback():
    main = errors.reporting_user_errors(_raise(KeyError("pool")))
    with pytest.raises(KeyError):
        main(["run.py"])
    assert errors.describe(ValueError("shapes (3,) and (4,) not aligned")) is None


def test_library_info_logs_are_dropped_not_their_warnings(tmp_path):
    own = tmp_path / "repo"
    keep = errors.OwnLogsOnly([own / "bacon_jax", own / "experiments"])

    def record(path, level):
        return logging.LogRecord("absl", level, str(path), 1, "message", None, None)

    library = "/venv/lib/python3.11/site-packages/orbax/checkpoint/_src/atomicity.py"
    assert not keep.filter(record(library, logging.INFO))
    assert keep.filter(record(library, logging.WARNING))
    assert keep.filter(record(own / "bacon_jax" / "train.py", logging.INFO))
    assert keep.filter(record(own / "experiments" / "run.py", logging.INFO))
    # A sibling whose name merely starts like ours is not ours.
    assert not keep.filter(record(own / "bacon_jax_old" / "train.py", logging.INFO))
