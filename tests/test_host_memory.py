"""`dynloss.host_memory`: a process that builds its training components for the CPU reuses freed tensor memory
instead of faulting fresh pages in for every step (the meta step's ~130,000 page faults per iteration on ResNet-32)."""
import platform
import subprocess
import sys

import pytest

# In a fresh process (malloc's settings are per process): build the components of a small CE run on the CPU, or not,
# then allocate and free 40 tensors of 8 MiB twice, as a step allocates and frees its activations; print the minor page
# faults of the second round. With glibc's defaults the first round is mapped (no block that large freed yet) and the
# second lands on new heap pages: it faults every page, in every run. A third round is no control: whether glibc
# trims the heap after the second depends on what else sits at its top (all pages in one run, one tensor's in another).
PROBE = r"""
import resource, sys, torch
if sys.argv[1] == "build":
    from pipelines.benchmarks.step import synthetic_components  # dynloss.builder.build_components, no data read
    synthetic_components("small_cnn", 8, "cpu", loss="ce")
def one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(2 << 20) for _ in range(40)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del tensors
    return faults
one_round()
print(one_round())
"""
PAGES = 40 * (8 << 20) // 4096  # what one round touches, in 4 KiB pages


def _second_round_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (other C libraries: unchanged)")
def test_a_cpu_training_process_reuses_freed_tensor_memory_instead_of_faulting_it_in_again():
    built = _second_round_faults("build")
    assert built < 0.1 * PAGES, f"{built} page faults for {PAGES} pages re-allocated after build_components"
    # the same rounds in a process with glibc's defaults fault every page in again: what the setting removes
    assert _second_round_faults("none") > 0.5 * PAGES
