"""Freed memory is kept for reuse (mt.allocator): tensors made and freed again and again come from
memory the process already has, not from fresh pages (glibc's default hands blocks above 32 MB back
to the kernel on free)."""

import subprocess
import sys

import pytest

PROGRAM = r"""
import resource, sys
import torch
from mt.allocator import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("unsupported")
    sys.exit()
def steps():  # tensors of 24 and 96 MB, as decoding steps make them, each freed at once
    for _ in range(5):
        torch.ones(24 << 18)
        torch.ones(96 << 18)
steps()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    if out.stdout.strip() == "unsupported":
        pytest.skip("this C library keeps no freed blocks above 32 MiB (an older glibc, or not glibc)")
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused():
    pages = 5 * (96 << 20) // 4096  # of the 96 MB tensors alone
    kept = faults("keep")
    assert faults("default") > 0.9 * pages  # fresh pages every time: what the setting prevents
    assert kept < 0.5 * pages  # 0 in most runs; glibc now and then takes fresh pages once
