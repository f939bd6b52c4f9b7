"""fp32 translation on CPU with weights packed once for MKL's GEMM (``mt translate --dtype fp32``).

A decoding step multiplies a few dozen rows (sentences × beams) by every weight matrix. For so few
rows ``F.linear`` spends much of its time repacking the weight into the GEMM kernel's layout at
every call. MKL can pack a matrix once (``cblas_sgemm_pack``, behind PyTorch's
``torch.ops.mkl._mkl_linear``), which is what CTranslate2 does on Intel and AMD CPUs; the products
are the same fp32 arithmetic. Each linear layer becomes a ``PackedFP32Linear`` for inference only
(it keeps the weights too, and packs a block of rows of the packed input projection the first time
cross-attention asks for it, as ``mt.int8.Int8Linear`` does).
"""

from __future__ import annotations

import torch
from torch import nn

from mt.model import Transformer

PACK_ROWS = 64  # the row count MKL is told to expect (a hint for its blocking; any count works)


def available() -> bool:
    """Whether this PyTorch build has MKL's packed GEMM."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedFP32Linear(nn.Module):
    """y = x Wᵀ + b with W packed once by MKL; ``rows(x, start, stop)`` applies rows start:stop of W."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._weight = weight.detach().float().contiguous()
        self._bias = None if bias is None else bias.detach().float().contiguous()
        self._packed: dict[tuple[int | None, int | None], tuple] = {}

    def _block(self, start: int | None, stop: int | None) -> tuple:
        key = (start, stop)
        if key not in self._packed:
            weight = self._weight[start:stop].contiguous()
            bias = None if self._bias is None else self._bias[start:stop].contiguous()
            self._packed[key] = (torch.ops.mkl._mkl_reorder_linear_weight(weight, PACK_ROWS), weight, bias)
        return self._packed[key]

    def rows(self, x: torch.Tensor, start: int | None, stop: int | None = None) -> torch.Tensor:
        packed, weight, bias = self._block(start, stop)
        lead = x.shape[:-1]
        y = torch.ops.mkl._mkl_linear(x.reshape(-1, self.in_features).contiguous(), packed, weight, bias,
                                      PACK_ROWS)  # (M, out)
        return y.view(*lead, y.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rows(x, None, None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp32 MKL-packed"


def pack_fp32(model: Transformer) -> Transformer:
    """Replace every linear layer of ``model`` (fp32, on the CPU, for inference) by a
    ``PackedFP32Linear``, the tied output projection included; in place. Returns the model."""
    model.replace_linears(PackedFP32Linear)
    return model
