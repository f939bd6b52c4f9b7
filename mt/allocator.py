"""Keeping freed memory for reuse: the C allocator's settings that every ``mt`` command applies first.

A decoding step makes and frees tensors of rows x vocabulary (24 MB at 750 rows and 8,000 pieces,
96 MB at 32,000), a training step its activations. glibc's malloc serves blocks above its mmap
threshold (adaptive, but at most 32 MB) with fresh pages from the kernel and returns them on free, so
every step page-faults and zeroes them anew: 400,000 faults and 0.9 s of system time per 1,000
sentences translated in fp32 on an AMD EPYC. With the mmap and trim thresholds at 1 GiB those blocks
come from the heap and stay there, as in a caching allocator: a process holds on to its peak memory
instead of handing it back between steps. Nothing here imports torch (``mt --help`` stays quick).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters
KEEP_FREED = 1 << 30  # bytes


def keep_freed_memory() -> bool:
    """Raise glibc's trim threshold and its mmap threshold to ``KEEP_FREED``; True where both took
    effect (recent glibc on Linux: 2.36 here), False elsewhere. An older glibc (2.30, for one)
    refuses an mmap threshold above 32 MiB: it then gets 32 MiB (blocks below that are kept), and
    the answer is False."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no C library to ask, or one without mallopt (not glibc)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    trim = bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED))
    if mallopt(M_MMAP_THRESHOLD, KEEP_FREED):
        return trim
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    return False
