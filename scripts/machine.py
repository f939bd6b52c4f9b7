"""What the benchmarks say about the machine they ran on: the CPU and its flags, and the matmul
ceiling of each precision (the best GEMM throughput of this machine and thread count, measured in
the same run as the figures it is compared with). In fp32 the ceiling is the better of the two GEMM
libraries in every PyTorch build, MKL (``torch.mm``) and oneDNN (what ``mt.linear`` calls where it
is faster): on AMD CPUs MKL stays below the machine's AVX-512 speed.

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


def _gemm(precision: str, shape: tuple[int, int, int], library: str = "mkl"):
    """(M, K) @ (K, N) as a call: ``torch.mm`` in fp32 or bf16 (in fp32 ``library`` "onednn": the
    same product through oneDNN, as ``mt.linear`` calls it), or the int8 GEMM that ``mt --dtype
    int8`` calls (FBGEMM, fp32 in and out, the input quantized inside)."""
    m, k, n = shape
    if library == "onednn":
        from mt.linear import _product

        a, w = torch.randn(m, k), torch.randn(n, k)
        return lambda: _product(a, w, None)
    if precision == "int8":
        from mt.int8 import ACTIVATION_GRID, _LINEAR, _pack

        x, packed = torch.rand(m, k) * 2 - 1, _pack(torch.randn(n, k))
        return lambda: _LINEAR(x, *ACTIVATION_GRID, packed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    return lambda: a @ b


def fp32_libraries() -> tuple[str, ...]:
    """The fp32 GEMM libraries of this PyTorch build."""
    from mt.linear import _onednn_op

    return ("mkl", "onednn") if _onednn_op() is not None else ("mkl",)


def matmul_ceilings(precision: str, threads: int) -> dict[str, float]:
    """The best GFLOP/s (GOP/s for int8) of a GEMM over ``SHAPES`` with ``threads`` threads, per
    library: fp32 with MKL and oneDNN, bf16 with ``torch.mm``, int8 with FBGEMM (as mt/int8.py)."""
    torch.set_num_threads(threads)
    libraries = fp32_libraries() if precision == "fp32" else ("mkl",)
    return {lib: max(_rate(_gemm(precision, shape, lib), shape) for shape in SHAPES) for lib in libraries}


def matmul_ceiling(precision: str, threads: int) -> float:
    """The machine's ceiling in ``precision``: the best of ``matmul_ceilings``."""
    return max(matmul_ceilings(precision, threads).values())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16,int8")
    args = parser.parse_args()
    print(cpu())
    for p in args.precisions.split(","):
        rates = matmul_ceilings(p, args.threads)
        unit = "GOP/s" if p == "int8" else "GFLOP/s"
        by = f" ({', '.join(f'{lib} {r:.0f}' for lib, r in rates.items())})" if len(rates) > 1 else ""
        print(f"{p}: {max(rates.values()):.0f} {unit} on {args.threads} threads{by}")
