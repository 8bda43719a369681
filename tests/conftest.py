"""Test-session settings: an XLA compilation cache shared by the run's pytest-xdist workers.

Many tests compile the same programs (the same tiny configs go through train.py from several
modules); with XLA's persistent cache the second compile of a program loads the first one's
executable. The cache is a fresh directory for this run only, so timings never depend on an earlier
run, and it is removed at the end. Results do not depend on it: a cached executable is the one the
compiler produced for the same program and options.
"""

import os
import shutil
import tempfile

import jax
import pytest

_CACHE_ENV = "BACON_JAX_TEST_XLA_CACHE"  # set by hand to keep a cache across runs
_OWNED = pytest.StashKey[str]()


def pytest_configure(config):
    # The main process (or the xdist controller, before it starts the workers, who inherit the
    # variable) creates the directory. It must be set before the first compile: jax decides once.
    if _CACHE_ENV not in os.environ:
        os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="bacon_jax_test_xla_cache_")
        config.stash[_OWNED] = os.environ[_CACHE_ENV]
    jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
    # Every program, not only those that took 1 s or more to compile (jax's default): the tests'
    # many sub-second programs recur across modules and workers (measured: ~10% less wall time
    # for tests/test_train.py and tests/test_export.py on 2 workers).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_unconfigure(config):
    owned = config.stash.get(_OWNED, None)
    if owned:
        shutil.rmtree(owned, ignore_errors=True)
