"""Int8 translation on CPU (``mt translate --dtype int8``): dynamic quantization.

Every linear layer's weight — attention projections, feed-forward layers and the output projection —
is stored as int8 with one scale per output row (symmetric: w ≈ scale·q, q in [-127, 127]); each call
quantizes its input activations with one scale per row (token) computed from that row, multiplies in
int8 with int32 accumulation (PyTorch's FBGEMM x86 kernels behind ``torch.ops.quantized``)
and returns fp32. Embeddings, layer norms, attention scores and the search stay in fp32. Like
CTranslate2's ``int8`` compute type (and unlike ``torch.ao.quantization.quantize_dynamic``, with one
activation scale per call), a sentence's translation never depends on its batch. Activations get 7
bits (±63 levels of the row's max |x|, as FBGEMM's ``reduce_range``: AVX2's int16 sums of u8·s8
pairs cannot saturate), one bit fewer than CTranslate2's.

The converted model is for inference only: it cannot be trained or saved as a checkpoint, and it
keeps the fp32 weights too (row blocks are packed on first use).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from mt.config import ConfigError
from mt.model import Transformer


class Int8Error(ConfigError):
    """int8 decoding is not possible here (device, PyTorch build)."""


def _pack(weight: torch.Tensor):
    """(out, in) fp32 weight -> FBGEMM's packed int8 weight with per-row scales."""
    weight = weight.detach().float().contiguous()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()  # (out,)
    zero = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # PyTorch announces the quantized tensor API's removal; 2.13 has it
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated")
        qweight = torch.quantize_per_channel(weight, scales, zero, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qweight, None)


# [-1, 1] onto u8 codes 1..127 (scale, zero point): 7 bits, so that AVX2's int16 sums of u8·s8 pairs
# cannot saturate (127·127·2 < 2^15)
ACTIVATION_GRID = (1 / 63, 64)
# fp32 in, quantized on a given grid (no pass over the input for its range), int8 GEMM, fp32 out
_LINEAR = getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32", None)


class Int8Linear(nn.Module):
    """y = x Wᵀ + b with W in int8 (per output row) and x quantized per call, one scale per row of x.
    ``rows(x, start, stop)`` applies one block of rows of W alone (see ``mt.model.PackedLinear``);
    each block is packed once.

    One scale per call (FBGEMM's dynamic linear) would make a sentence's result depend on the others
    in its batch. So each row is divided by its own max |x| first and quantized on one fixed grid
    over [-1, 1] (``ACTIVATION_GRID``), i.e. with its own scale; the output is multiplied back row
    by row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._weight = weight.detach()
        self._bias = None if bias is None else bias.detach().float()
        self._packed = {(None, None): _pack(self._weight)}

    def rows(self, x: torch.Tensor, start: int | None, stop: int | None = None) -> torch.Tensor:
        key = (start, stop)
        if key not in self._packed:
            self._packed[key] = _pack(self._weight[start:stop])
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()  # (M, in)
        scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)  # (M, 1); 8x faster than vector_norm(inf)
        y = _LINEAR(x / scale, *ACTIVATION_GRID, self._packed[key])  # (M, out); every input in [-1, 1]
        y = y.mul_(scale) if self._bias is None else torch.addcmul(self._bias[start:stop], y, scale)
        return y.view(*lead, y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x, None, None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def unavailable() -> str:
    """Why int8 decoding cannot run with this PyTorch build and quantized engine, or '' when it can
    (found by running the kernel once on a tiny input)."""
    engine = torch.backends.quantized.engine
    try:
        probe = Int8Linear(torch.eye(4), torch.zeros(4))(torch.ones(1, 4))
        if probe.shape == (1, 4) and torch.allclose(probe, torch.ones(1, 4), atol=0.05):
            return ""
        problem = "wrong results"
    except (RuntimeError, TypeError) as e:  # no such operator / kernel for this engine
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (f"int8 decoding needs PyTorch's x86 quantized kernels (FBGEMM); with the quantized engine "
            f"{engine!r} (supported: {torch.backends.quantized.supported_engines}) they fail: {problem}")


def quantize_int8(model: Transformer) -> Transformer:
    """Replace every linear layer of ``model`` (on the CPU, in eval mode) by an ``Int8Linear``, and
    give a tied output projection its own int8 copy; in place. Returns the model."""
    reason = unavailable()
    if reason:
        raise Int8Error(f"{reason}; use --dtype fp32")
    if next(model.parameters()).device.type != "cpu":
        raise Int8Error("int8 decoding runs on the CPU only: use --device cpu (or auto), or --dtype fp32/bf16")
    model.replace_linears(Int8Linear)
    return model
