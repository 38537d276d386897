"""Python's garbage collector in the processes that run this package (docs/performance.md, sections 2 and 3).

Every such process - the ``dynloss`` driver, the Ray Train worker, Ray Data's decode workers - imports torch,
torchvision, pyarrow and Ray: ~400k objects that live as long as the process. CPython's collector, at its default
thresholds (700, 10, 10), walks all of them at each full collection: about ten times while they are imported
(~0.5-1 s of a process's start-up on the 2-core development machine), then every few seconds in a process that
allocates fast (a decode worker at full rate: 0.2-0.25 s every ~6 s, a stall of the stream).

- Importing ``pipelines`` calls ``for_startup()``: a young generation of 10,000 allocations instead of 700, so
  start-up triggers few collections. A process that has set its own thresholds keeps them.
- ``settle()``, once a process is past its imports (a decode worker's 4th, 8th, 16th, ... call; a Train worker after
  its first epoch): a full collection, then ``gc.freeze()`` - what is alive then, the modules and Ray's worker
  state, moves to the permanent generation that later collections skip - and the default thresholds back, so
  garbage in reference cycles goes as promptly as before.
"""
from __future__ import annotations

import gc

DEFAULT = (700, 10, 10)  # CPython's
STARTUP = (10_000, 10, 10)


def for_startup() -> None:
    if gc.get_threshold() == DEFAULT:
        gc.set_threshold(*STARTUP)


def settle() -> None:
    gc.collect()
    gc.freeze()
    if gc.get_threshold() == STARTUP:
        gc.set_threshold(*DEFAULT)
