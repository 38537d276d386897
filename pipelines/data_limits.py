"""Ray Data's resource limits from an execution's first scheduling steps, not one second in (Ray 2.60).

Every execution of a dataset (each epoch of each stream: train, rank pass, evaluation) asks Ray Data's autoscaling
coordinator actor what it may use. Its first answer is empty (the call is asynchronous and nothing has come back
yet), and Ray Data's ``ResourceManager`` keeps that answer for ``GLOBAL_LIMITS_UPDATE_INTERVAL_S`` (1 s): limits
of zero. Under zero limits the allocator lets an operator with nothing running start one task and no more, so for
its first second every execution ran one decode task, whatever the cores. A Fashion-MNIST-LT epoch is shorter
than that: its held split's second task started ~1.05 s in, and the ingest benchmark's rate did not grow from 1 to
2 CPUs (docs/performance.md section 2, session 23: `ray.timeline()` and the allocator's budgets step by step).

`FirstLimits` (an execution callback the datasets of `pipelines.data.build_dataset` carry in their DataContext, so
it runs wherever the dataset executes: the driver, or the SplitCoordinator actor of a Ray Train run) re-reads the
limits at each scheduling step until they name CPUs or GPUs, for at most `WINDOW_S`; the coordinator's answer
came ~0.1 s in here. Only one call to the coordinator is ever in flight (its client's own rule), and the
scheduling loop steps at least every 0.1 s. After that the allocator decides as before (it stays on).
"""

from __future__ import annotations

import logging
import time

import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

log = logging.getLogger(__name__)

#: seconds from an execution's start during which zero limits are re-read at every step.
WINDOW_S = 5.0


class FirstLimits(ExecutionCallback):
    """Re-read Ray Data's resource limits at each scheduling step while they are zero (module docstring)."""

    def before_execution_starts(self, executor) -> None:
        self._until = time.monotonic() + WINDOW_S

    def on_execution_step(self, executor) -> None:
        if time.monotonic() > self._until:
            return
        manager = getattr(executor, "_resource_manager", None)
        if manager is None or not hasattr(manager, "_global_limits_last_update_time"):
            self._until = 0.0  # another Ray Data: its limits are read as it reads them
            log.debug("Ray Data %s has no ResourceManager limit cache; FirstLimits does nothing", ray.__version__)
            return
        limits = manager.get_global_limits()
        if limits.cpu > 0 or limits.gpu > 0:
            self._until = 0.0  # known: the cache's own interval from here on
        else:
            manager._global_limits_last_update_time = 0.0  # read again at the next step


def first_limits(ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds`` with `FirstLimits` among its execution callbacks (its own DataContext; returned for chaining)."""
    callbacks = ds.context.custom_execution_callback_classes
    if FirstLimits not in callbacks:
        callbacks.append(FirstLimits)
    return ds
