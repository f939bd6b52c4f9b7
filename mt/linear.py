"""fp32 matrix products on the CPU through the fastest GEMM library PyTorch ships for this CPU.

PyTorch's CPU ``torch.mm`` and ``F.linear`` call Intel MKL in fp32. On AMD CPUs MKL does not use
AVX-512, and on an AMD EPYC of the Zen 5 family (512-bit FMA units) it reaches less than half of
what the machine can do: 160-190 GFLOP/s on 2 threads at the model's shapes, where oneDNN (also in
every PyTorch build, as ``torch.ops.mkldnn._linear_pointwise``) reaches 390-440 GFLOP/s with the
same fp32 arithmetic (error against float64 5.7e-5 vs MKL's 3.8e-5 over 256 products;
``scripts/machine.py`` measures both). Where oneDNN is chosen, ``linear`` (forward and backward)
and ``mm`` call it; everywhere else, and for bf16/fp16 and autocast (which PyTorch already sends to
oneDNN), they are ``F.linear`` and ``torch.mm``.

For translating, ``prepack`` replaces a model's linear layers by ``Prepacked`` ones, whose weights are
reordered once into oneDNN's blocked layout (oneDNN reorders a plain weight on every call): in fp32
where oneDNN is chosen, and in bf16. Products in bf16 (or fp16) without autograd pad their rows to a
multiple of ``ROW_QUANTUM``, so that oneDNN, which builds a kernel for each new shape, builds few.

The choice is made from the CPU, never from a timing, so that it is the same in every process on a
machine (a resumed run multiplies as the run before it did): oneDNN on AMD CPUs with AVX-512. The
environment variable ``MT_FP32_GEMM`` (``onednn`` or ``mkl``) overrides it, for comparisons.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mt.errors import MtError

ENV = "MT_FP32_GEMM"
CHOICES = ("onednn", "mkl")


class GemmError(MtError):
    """``MT_FP32_GEMM`` names no library."""


def _onednn_op():
    """oneDNN's linear operator in this PyTorch build, or None."""
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


@functools.lru_cache(maxsize=None)
def fp32_gemm(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, str]:
    """The library for fp32 CPU matrix products here ("onednn" or "mkl") and why."""
    requested = os.environ.get(ENV, "")
    if requested and requested not in CHOICES:
        raise GemmError(f"{ENV}={requested!r} in the environment: choose {' or '.join(CHOICES)}")
    if _onednn_op() is None:
        return "mkl", "this PyTorch has no oneDNN linear"
    if requested:
        return requested, f"{ENV}={requested}"
    try:
        info = cpuinfo.read_text(errors="replace")
    except OSError:
        return "mkl", "no /proc/cpuinfo to tell the CPU"
    if "AuthenticAMD" in info and "avx512f" in info.split():
        return "onednn", "AMD CPU with AVX-512, where MKL runs at AVX2 speed"
    return "mkl", "MKL is PyTorch's fast fp32 path on this CPU"


def onednn_bf16() -> bool:
    """Whether oneDNN computes bf16 products on this CPU (AVX-512 or AMX; not on AVX2 alone)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return _onednn_op() is not None and check is not None and bool(check())


def _plain(*tensors: torch.Tensor) -> bool:
    """fp32 CPU tensors outside autocast: the products this module may send to oneDNN."""
    return (not torch.is_autocast_enabled("cpu")
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and fp32_gemm()[0] == "onednn")


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) @ weight (N, K)ᵀ + bias (N,) with oneDNN (weight may be a transposed view)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])  # (M, N)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad, weight.t(), None)  # (..., K) = grad @ W
        if ctx.needs_input_grad[1]:
            grad_w = _mm(grad2.t(), x.reshape(-1, x.shape[-1]))  # (N, K) = gradᵀ @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b


ROW_QUANTUM = 32  # rows: bf16/fp16 inference products and the fused loss's blocks take a multiple of it


def _rows_padded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, product=F.linear,
                 *options) -> torch.Tensor:
    """``product(x, weight, bias, *options)`` (``F.linear``) with x's rows (all dimensions but the
    last, flattened) padded with zeros to a multiple of ``ROW_QUANTUM``. oneDNN, which computes bf16
    products on a CPU, builds a kernel for every new matrix shape (a (M, 256) x (256, 1,024) product:
    3.7 ms the first time, 0.39 ms after, on a Xeon with AMX), and a decoding step's row count (the
    live hypotheses) takes almost every value up to the batch's beams x sentences; padded, a few
    dozen shapes serve a whole input."""
    K = x.shape[-1]
    M = x.numel() // K
    pad = -M % ROW_QUANTUM
    if pad == 0:
        return product(x, weight, bias, *options)
    rows = torch.cat([x.reshape(M, K), x.new_zeros(pad, K)])  # (M + pad, K)
    out = product(rows, weight, bias, *options)  # (M + pad, N)
    return out[:M].view(*x.shape[:-1], out.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x (..., K), weight (N, K), bias (N,) -> (..., N)."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not _plain(*tensors):
        if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and not torch.is_grad_enabled():
            return _rows_padded(x, weight, bias)
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _Linear.apply(x, weight, bias)
    return _product(x, weight, bias)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) with oneDNN, as a·bᵀᵀ or as (bᵀ·aᵀ)ᵀ, whichever copies less: oneDNN
    takes its weight in any layout but copies an input that is not contiguous, and a product's
    transposed operand (a weight gradient's gradᵀ, 8000 x 524 in the loss) is often the larger one.
    The result may be a transposed view."""
    copy_a = 0 if a.is_contiguous() else a.numel()
    copy_b = 0 if b.t().is_contiguous() else b.numel()
    if copy_b < copy_a:
        return _product(b.t(), a, None).t()
    return _product(a, b.t(), None)


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.mm(a, b)`` without autograd: a (M, K), b (K, N) -> (M, N), possibly a transposed view."""
    if not _plain(a, b):
        return torch.mm(a, b)
    return _mm(a, b)


class Linear(nn.Linear):
    """``nn.Linear`` whose product is ``linear`` (the same parameters and state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Prepacked(nn.Module):
    """Inference only: y = x Wᵀ + b through oneDNN with W reordered once into its blocked layout (fp32
    or bf16; a bf16 input's rows are padded as in ``_rows_padded``).
    ``rows(x, start, stop)`` applies one block of rows of W alone (see ``mt.model.PackedLinear``);
    each block is reordered on first use."""

    ROWS = 512  # the number of input rows oneDNN's layout is chosen for (decoding steps: ~100-700)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._weight = weight.detach()
        self._bias = None if bias is None else bias.detach()
        self._packed: dict[tuple[int | None, int | None], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def rows(self, x: torch.Tensor, start: int | None, stop: int | None = None) -> torch.Tensor:
        key = (start, stop)
        if key not in self._packed:
            bias = None if self._bias is None else self._bias[start:stop].contiguous()
            weight = torch.ops.mkldnn._reorder_linear_weight(self._weight[start:stop].contiguous(), self.ROWS)
            self._packed[key] = (weight, bias)
        weight, bias = self._packed[key]
        if x.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return _rows_padded(x, weight, bias, torch.ops.mkldnn._linear_pointwise, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x, None, None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN prepacked"


def prepack(model) -> bool:
    """For translating with oneDNN's products: every linear layer of ``model`` (an
    ``mt.model.Transformer`` on the CPU, eval mode, in bf16 where oneDNN computes it, or in fp32
    where ``fp32_gemm`` chose oneDNN) becomes ``Prepacked``, in place
    (``Transformer.replace_linears``: the model can no longer be trained or saved). Returns whether
    it did; a model in another dtype or on another device is left as it is."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]  # none: replaced already (int8)
    if not linears or linears[0].weight.device.type != "cpu" or _onednn_op() is None:
        return False
    dtype = linears[0].weight.dtype
    onednn_fp32 = dtype == torch.float32 and fp32_gemm()[0] == "onednn"
    if not onednn_fp32 and not (dtype == torch.bfloat16 and onednn_bf16()):
        return False
    model.replace_linears(Prepacked)
    return True
