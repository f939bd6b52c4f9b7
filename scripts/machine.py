"""What the benchmarks say about the machine they ran on: the CPU and its flags, and the matmul
ceiling of each precision (the best GEMM throughput of this machine and thread count, measured in
the same run as the figures it is compared with).

    python scripts/machine.py [--threads 2]      (prints the CPU line and the ceilings)
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
# GEMM shapes (M, K, N) of the reference model's training step: tokens x d_model x ffn, its transpose,
# and a loss chunk (rows x d_model x vocabulary); the ceiling is the best of them
SHAPES = ((2048, 256, 1024), (2048, 1024, 256), (512, 256, 8000), (2048, 1024, 1024))


def cpu() -> str:
    """'AMD EPYC, flags avx2 avx512f avx512_bf16' (the model name and the flags of ``FLAGS`` it has)."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    flags = set(info.split())
    return f"{name}, flags {' '.join(f for f in FLAGS if f in flags) or 'none of ' + '/'.join(FLAGS)}"


def _rate(gemm, shape: tuple[int, int, int], repeats: int = 5) -> float:
    """G(FL)OP/s of ``gemm()``, an (M, K) @ (K, N) product: the median of ``repeats`` timings of
    ~20 GFLOP each, after a warm-up."""
    m, k, n = shape
    calls = max(1, int(2e10 // (2 * m * k * n)))
    for _ in range(2):
        gemm()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            gemm()
        rates.append(2 * m * k * n * calls / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


def _gemm(precision: str, shape: tuple[int, int, int]):
    """(M, K) @ (K, N) as a call: ``torch.mm`` in fp32 or bf16, or the int8 GEMM that
    ``mt --dtype int8`` calls (FBGEMM, fp32 in and out, the input quantized inside)."""
    m, k, n = shape
    if precision == "int8":
        from mt.int8 import ACTIVATION_GRID, _LINEAR, _pack

        x, packed = torch.rand(m, k) * 2 - 1, _pack(torch.randn(n, k))
        return lambda: _LINEAR(x, *ACTIVATION_GRID, packed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    return lambda: a @ b


def matmul_ceiling(precision: str, threads: int) -> float:
    """The best GFLOP/s (GOP/s for int8) of a GEMM over ``SHAPES`` in fp32, bf16 (``torch.mm``) or
    int8 (FBGEMM's, as mt/int8.py calls it) with ``threads`` threads."""
    torch.set_num_threads(threads)
    return max(_rate(_gemm(precision, shape), shape) for shape in SHAPES)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    args = parser.parse_args()
    print(cpu())
    for p in args.precisions.split(","):
        print(f"{p}: {matmul_ceiling(p, args.threads):.0f} G{'OP' if p == 'int8' else 'FLOP'}/s on {args.threads} threads")
