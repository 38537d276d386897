"""Fixtures shared by the test modules: a local Ray runtime, and scikit-learn's digits prepared as real shards.

Both are module-scoped: each module that asks gets its own (a Ray runtime per module keeps one module's actors and
placement groups out of the next one's resources).
"""
from __future__ import annotations

import pytest


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
