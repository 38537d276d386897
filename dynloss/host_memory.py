"""glibc's malloc in a process that trains on the CPU: freed tensor memory is kept for the next step.

A CPU tensor's memory comes from malloc. With glibc's defaults a block above the mmap threshold (128 KiB at first,
raised to the largest block freed so far, at most 32 MiB) is mapped afresh and unmapped when freed, and free memory
at the top of the heap beyond twice that threshold goes back to the OS: either way the next step's tensors land on
pages the kernel must fault in and zero again. The meta step frees and re-allocates a few hundred MB per iteration
(three passes' activations, the JVP's tangents): measured on ResNet-32, batch 128, on the 2-core development machine
(``/usr/bin/time``, `dynloss benchmark step --in-process`): ~130,000 minor page faults per meta step against
~11,000 per CE step, its ReLU and batch-norm kernels 1.4-4x slower than the same kernels in the CE step
(docs/performance.md section 1, session 27).

``keep_freed_heap()`` (called by ``dynloss.builder.build_components`` for a CPU device) sets, once per process,
what PyTorch's CPU tuning guide gets by preloading jemalloc or tcmalloc, with glibc itself (``mallopt``): a fixed
mmap threshold at glibc's maximum, so blocks up to 32 MiB come from the heap, and a trim threshold of 2 GiB, so the
heap keeps what a step freed. Both are needed: either alone turns off glibc's own adjustment of the other and
faults more than the defaults (40 million faults in a 26-step run with the trim threshold alone). A process then
holds its peak heap, which a training process reaches every step anyway; blocks above 32 MiB (ResNet-50 at 224 px
on a CPU) are still mapped per allocation. Other C libraries (musl, macOS): nothing is changed.
"""
from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int


@functools.cache
def keep_freed_heap() -> bool:
    """Set glibc's mmap and trim thresholds as the module docstring says (once per process); True if they are set."""
    if platform.libc_ver()[0] != "glibc" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
