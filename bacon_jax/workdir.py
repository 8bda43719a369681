"""A run directory's lock, its config.json, and the JSON-lines logs that a resumed run rewinds.

`locked(workdir)` holds `<workdir>/run.lock` while a run or a re-evaluation writes there. The file is
created with O_CREAT | O_EXCL (atomic, also on NFS v3 and later) and names its holder: pid, host,
start time and command. A second process is refused with that name; a lock left by a crashed
process (same host, pid no longer alive) is taken over with a warning; a lock from another host
cannot be checked from here, so the message says how to remove it if that run is dead. In a
multi-process run only process 0 takes the lock, and every process learns whether it got it.
"""

import contextlib
import datetime
import json
import os
import socket
import sys
import time

from absl import logging
import jax
import numpy as np

from bacon_jax import errors

LOCK_NAME = "run.lock"
CONFIG_NAME = "config.json"
_ATTEMPTS = 5
_WAIT_SECONDS = 0.2


def _holder():
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read(path):
    """The holder recorded in lock file `path`, {} when unreadable, None when it is gone."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def _create(path, holder):
    """Creates lock file `path` holding `holder`; False when it already exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
    return True


def _describe(holder):
    return (f"process {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command')!r})")


def acquire(workdir):
    """Takes `workdir`'s lock (creating the directory); returns the lock file's path.

    Raises:
        errors.UserError: another live process holds it, or one on another host.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_NAME)
    mine = _holder()
    for _ in range(_ATTEMPTS):  # a lock released, taken over or being written: look again
        if _create(path, mine):
            return path
        holder = _read(path)
        if not holder:  # gone, or its holder is writing it right now
            time.sleep(_WAIT_SECONDS)
            continue
        if holder.get("host") != mine["host"]:
            raise errors.UserError(
                f"{workdir} is in use by {_describe(holder)}. If that run is no longer alive, "
                f"remove {path} and rerun.")
        pid = holder.get("pid")
        if isinstance(pid, int) and _pid_alive(pid):
            raise errors.UserError(
                f"{workdir} is in use by {_describe(holder)}. Wait for it to finish, stop it, "
                f"or use another --workdir.")
        logging.warning("Taking over the lock of %s: %s is no longer running (it crashed or was "
                        "killed).", workdir, _describe(holder))
        if _read(path) == holder:
            os.remove(path)
    raise errors.UserError(
        f"{path} exists but names no live holder after {_ATTEMPTS} tries. If no run uses "
        f"{workdir}, remove it and rerun.")


def release(path):
    """Removes lock file `path` if this process holds it."""
    holder = _read(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        os.remove(path)


@contextlib.contextmanager
def locked(workdir):
    """Holds `workdir`'s lock (process 0 of a multi-process run) for the `with` block.

    Released however the block ends (error, Ctrl-C); a process killed outright leaves the file,
    which the next run takes over (see the module docstring).
    """
    path, refusal = None, None
    if jax.process_index() == 0:
        try:
            path = acquire(workdir)
        except errors.UserError as error:
            refusal = error
    if jax.process_count() > 1:  # every process stops if process 0 could not take the lock
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

        taken = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
        if not taken and refusal is None:
            refusal = errors.UserError(f"Process 0 could not lock {workdir} (see its log).")
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        if path is not None:
            release(path)


def read_config(workdir):
    """The config.json of the run in `workdir` as a dict, or None when there is none.

    Raises:
        errors.UserError: config.json is not valid JSON.
    """
    path = os.path.join(workdir, CONFIG_NAME)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as error:
        raise errors.UserError(
            f"{path} is not valid JSON ({error}); it records the run in {workdir}. Restore it, or "
            f"use a new --workdir.") from None


def truncate_jsonl(path, before):
    """Keeps only the rows of JSON-lines file `path` whose "iteration" is below `before`.

    Atomic (a temporary file replaces the old one); a missing file is left missing.

    Returns:
        The kept rows, parsed.
    """
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kept = [row for row in rows if row["iteration"] < before]
    if len(kept) != len(rows):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(tmp, path)
    return kept
