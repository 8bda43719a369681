"""User errors, and how the scripts run: one line for what the user can fix, tracebacks for bugs.

Library code raises `UserError` for anything the user can fix: a bad config value, missing or
malformed data, a workdir that holds another run or is in use, a checkpoint that cannot be used. The
entry points (`experiments/run.py`, `evaluate.py`, `pretrain.py`) start through `run_script(main)`,
which ends such an error with one line, `ERROR: <what is wrong and what to do>`, and exit status 1.
Ctrl-C ends with the resume hint of an `Interrupted` (status 130), and a full disk (ENOSPC anywhere
in the exception's chain) with one line saying so. Any other exception is a bug and keeps its
traceback.

`run_script` also keeps library INFO logs out of the way (Orbax writes ~60 lines per checkpoint):
only the project's own INFO lines and everyone's warnings and errors are shown, unless the script
runs with `--library_logs`.

This module imports only the standard library at the top: config files import it (through
config_lib) when they are loaded.
"""

import errno
import logging
import os
import sys


class UserError(ValueError):
    """An error in what the user asked for or gave; its message says what is wrong and what to do.

    A ValueError, so callers that catch ValueError around config and data checks keep working.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with where the run stopped and how to resume it as the message."""


# Exit statuses: 1 as absl's flag errors, 130 the shell's for a process ended by SIGINT.
_USER_ERROR_STATUS = 1
_INTERRUPTED_STATUS = 130
_GENERIC_INTERRUPT = ("Interrupted. Rerunning the same command resumes from the latest checkpoint "
                      "(nothing is lost but the work since it).")


def disk_full_error(error):
    """The ENOSPC error in `error`'s chain of causes and contexts, or None.

    Libraries wrap the OSError (Orbax and TensorStore re-raise it with their own types, and an
    exception while handling it can end the chain), so the whole chain is searched, by errno and
    by the OS's message.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        if os.strerror(errno.ENOSPC) in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def describe(error):
    """The one-line message for an exception the user can act on, or None for a bug."""
    if isinstance(error, UserError):
        return str(error)
    full = disk_full_error(error)
    if full is not None:
        where = f" while writing {full.filename}" if getattr(full, "filename", None) else ""
        return (f"No space left on device{where}. Free some space (or use a --workdir on another "
                "disk) and rerun the same command: it resumes from the latest checkpoint.")
    return None


def _fail(message, status):
    sys.stderr.flush()
    sys.stderr.write(f"ERROR: {' '.join(message.split())}\n")
    sys.stderr.flush()
    sys.exit(status)


def reporting_user_errors(main):
    """`main` wrapped so that user errors, Ctrl-C and a full disk exit with one line (see above)."""

    def wrapped(argv):
        try:
            return main(argv)
        except KeyboardInterrupt as interrupt:
            _fail(str(interrupt) or _GENERIC_INTERRUPT, _INTERRUPTED_STATUS)
        except Exception as error:  # pylint: disable=broad-except
            message = describe(error)
            if message is None:
                raise  # a bug: keep the traceback
            _fail(message, _USER_ERROR_STATUS)

    return wrapped


class OwnLogsOnly(logging.Filter):
    """Passes warnings and errors, and INFO records logged from files under `own_dirs`."""

    def __init__(self, own_dirs):
        super().__init__()
        self._own = tuple(os.path.join(os.path.abspath(d), "") for d in own_dirs)

    def filter(self, record):
        return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(
            self._own)


def run_script(main):
    """Runs a script's `main` with absl: the config flag checks, quiet libraries, one-line errors.

    Defines `--library_logs`, parses the flags with `config_lib.parse_flags` (which checks the
    config before anything runs), installs `OwnLogsOnly` on absl's handler unless
    `--library_logs`, and runs `main` through `reporting_user_errors`.

    Args:
        main: the script's `main(argv)`; the directory of its file and the bacon_jax package are
            the project's own log sources.
    """
    from absl import app, flags  # pylint: disable=g-import-not-at-top
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

    from bacon_jax import config_lib  # pylint: disable=g-import-not-at-top

    library_logs = flags.DEFINE_bool(
        "library_logs", False,
        "Also show the INFO logs of libraries (Orbax, JAX, TFDS, ...); by default only the "
        "project's own lines and everyone's warnings and errors are shown.",
        module_name=sys.argv[0],  # listed with the script's own flags in --help
    )
    own_dirs = (os.path.dirname(os.path.abspath(__file__)),
                os.path.dirname(os.path.abspath(main.__code__.co_filename)))
    guarded = reporting_user_errors(main)

    def quiet_main(argv):
        if not library_logs.value:
            absl_logging.get_absl_handler().addFilter(OwnLogsOnly(own_dirs))
        return guarded(argv)

    app.run(quiet_main, flags_parser=config_lib.parse_flags)
