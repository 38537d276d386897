"""Fixtures shared by the test modules: a local Ray runtime, and scikit-learn's digits prepared as real shards.

Both are module-scoped: each module that asks gets its own (a Ray runtime per module keeps one module's actors and
placement groups out of the next one's resources).

The process ends with ``os._exit`` once pytest is done (``_exit_without_native_teardown``), see there.
"""
from __future__ import annotations

import atexit
import os
import sys

import pytest

_SESSION: list[pytest.Session] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSION.append(session)


def _exit_without_native_teardown() -> None:
    """Leave with pytest's exit status, skipping the interpreter's finalization and C++ static destructors.

    ``ray.shutdown()`` leaves native threads running in the driver (measured on Ray 2.60: after
    ``ray.init(); ray.shutdown()`` the threads ``gcs_client_io_service``, ``worker.io``, gRPC's ``event_engine`` and
    ``grpc_global_timer`` are still there, and one more thread per runtime), and this process starts and stops a
    runtime per test module that needs one. Once, in November 2026, a CI run printed "489 passed" and then died of
    SIGSEGV (exit 139) after pytest had finished, where nothing of this project runs any more. What runs here:
    every atexit handler registered after this module was imported (Ray's, MLflow's, torch's, pytest's own; all
    of them, last-in first-out), then ``os._exit``. The tests' results and the exit status are pytest's; what is
    skipped is only the teardown the tests do not test. The test command runs under ``-X faulthandler``
    (cluster/local/dev.sh), so a crash anywhere else prints every thread's stack.
    """
    if not _SESSION:  # pytest never got as far as a session: leave the normal way
        return
    status = int(_SESSION[-1].exitstatus)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


atexit.register(_exit_without_native_teardown)  # registered first, so it runs last


@pytest.fixture(scope="module")
def ray_local():
    """An embedded Ray runtime of 2 CPUs started the way every pipeline starts one (pipelines.ray_runtime)."""
    pytest.importorskip("ray")
    import ray.data

    from pipelines.ray_runtime import init_ray, shutdown_ray

    init_ray(address="local", num_cpus=2)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """Digits made long-tailed (imbalance 0.1) with 30% symmetric noise, prepared by pipelines.prepare."""
    from pipelines import prepare

    out = str(tmp_path_factory.mktemp("data") / "digits_lt")
    assert prepare.main(["digits", "--out", out, "--imbalance", "0.1", "--noise", "sym:0.3", "--workers", "1",
                         "--no-progress"]) == 0
    return out
