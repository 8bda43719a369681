"""The environment of the processes tests start (scripts run as a user runs them)."""

import os

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def subprocess_env(device_count=None, **extra):
    """This test run's environment for a child process on the CPU.

    The child keeps the run's other XLA flags (the test command's LLVM level) and shares its
    compilation cache (conftest.py), so programs compiled by one test's processes load in the
    next; it sees `device_count` fake CPU devices (None: one, the host's).
    """
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
             if not flag.startswith(DEVICE_COUNT_FLAG)]
    if device_count:
        flags.append(f"{DEVICE_COUNT_FLAG}={device_count}")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))
    cache = os.environ.get("BACON_JAX_TEST_XLA_CACHE")
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update(extra)
    return env
