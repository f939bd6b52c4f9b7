"""Label-smoothed cross-entropy (Szegedy et al., 2016) for teacher-forced translation.

The smoothed target puts 1 - ε on the reference token and ε/V on every class (the reference
included), so per token

    loss = (1 - ε)·(-log p_y) + (ε/V)·Σ_v(-log p_v)        (= ``F.cross_entropy(label_smoothing=ε)``)

Two implementations of the same value:

* ``label_smoothed_loss`` on given logits (N, V): the reference, used on small inputs and in tests.
* ``linear_label_smoothed_loss`` on decoder states (N, D) and the output projection (V, D): the
  projection, the softmax and the gradient are computed together, a few hundred rows at a time, so
  the (N, V) logits never exist in memory. On a CPU this is what makes the loss cheap: a chunk's
  logits stay in cache while softmax, loss and gradient read them, where a full-size softmax streams
  N·V floats through memory five times (forward, log-softmax, NLL, backward). The gradient is known
  in the forward pass (the loss is a sum), so it is computed there and only scaled in backward
  (the approach of Liger-Kernel's fused linear cross-entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from typing import TYPE_CHECKING

from mt.linear import mm
from mt.tokenizer import PAD_ID

if TYPE_CHECKING:
    from mt.batch import Batch
    from mt.model import Transformer

CHUNK_ELEMENTS = 1 << 22  # logits per chunk (16 MB in fp32: 512 rows of an 8k vocabulary)
# Chunks have a multiple of this many rows, the last one padded up to it: oneDNN (the bf16 products on
# a CPU) builds a kernel for each new matrix shape on first use, 12-24 ms for a (n, 256) x (256, 8,000)
# product on a Xeon with AMX, and a last chunk of any size would take a new one almost every batch.
ROW_QUANTUM = 32


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, epsilon: float,
                        ignore_index: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross-entropy and summed NLL over non-ignored targets; logits (N, V),
    target (N,). The NLL (for perplexity) carries no gradient."""
    logits = logits.float()
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=epsilon, reduction="sum")
    with torch.no_grad():
        nll = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return loss, nll


class _LinearLabelSmoothedCE(torch.autograd.Function):
    """loss, nll = LS-CE(hidden @ weightᵀ, target), chunk by chunk; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, epsilon: float,
                ignore_index: int, compute_dtype: torch.dtype, chunk_rows: int, grad_enabled: bool):
        N, V = hidden.shape[0], weight.shape[0]
        # needs_input_grad only says requires_grad; under torch.no_grad (validation) no gradient is wanted
        need_hidden = grad_enabled and ctx.needs_input_grad[0]
        need_weight = grad_enabled and ctx.needs_input_grad[1]
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        loss = hidden.new_zeros((), dtype=torch.float32)
        nll = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        for start in range(0, N, chunk_rows):
            stop = min(start + chunk_rows, N)
            h_rows, t = h[start:stop], target[start:stop]  # (n, D), (n,)
            n = stop - start
            padded = min(chunk_rows, -(-n // ROW_QUANTUM) * ROW_QUANTUM)
            if padded > n:  # zero rows with ignored targets: they add nothing, and the shape is one of few
                h_rows = torch.cat([h_rows, h_rows.new_zeros(padded - n, h_rows.shape[1])])
                t = torch.cat([t, t.new_full((padded - n,), ignore_index)])
            keep = (t != ignore_index)[:, None]  # (n, 1)
            safe_t = t.masked_fill(~keep[:, 0], 0)[:, None]  # (n, 1): ignored rows point anywhere
            log_probs = torch.log_softmax(mm(h_rows, w.t()).float(), dim=1)  # (n, V) fp32
            token_nll = -log_probs.gather(1, safe_t).masked_fill_(~keep, 0.0)  # (n, 1)
            smooth = -log_probs.sum(1, keepdim=True).masked_fill_(~keep, 0.0)  # (n, 1): Σ_v -log p_v
            nll += token_nll.sum()
            loss += (1.0 - epsilon) * token_nll.sum() + (epsilon / V) * smooth.sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss / d logits = softmax - smoothed target, zero on ignored rows
            grad = log_probs.exp_()
            grad.scatter_add_(1, safe_t, grad.new_full(safe_t.shape, -(1.0 - epsilon)))
            grad = grad.sub_(epsilon / V).to(compute_dtype).mul_(keep)  # (n, V)
            if grad_hidden is not None:
                grad_hidden[start:stop] = mm(grad, w)[:n]  # (n, D)
            if grad_weight is not None:
                grad_weight += mm(grad.t(), h_rows)  # (V, D), accumulated in fp32
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_nll: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def linear_label_smoothed_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, epsilon: float,
                               ignore_index: int = PAD_ID,
                               chunk_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed CE and summed NLL of the logits ``hidden @ weight.T`` without forming them.

    hidden (N, D), weight (V, D), target (N,). Under autocast the matmuls run in the autocast dtype
    (softmax and sums in fp32), as they would for ``F.linear`` followed by ``label_smoothed_loss``.
    ``chunk_rows``: rows per chunk (0: a multiple of ``ROW_QUANTUM``, as many as fit ``CHUNK_ELEMENTS``
    logits).
    """
    chunk_rows = chunk_rows or max(CHUNK_ELEMENTS // weight.shape[0] // ROW_QUANTUM * ROW_QUANTUM, ROW_QUANTUM)
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    grad_enabled = torch.is_grad_enabled()  # always off inside forward: ask here
    with torch.autocast(device, enabled=False):
        return _LinearLabelSmoothedCE.apply(hidden, weight, target, float(epsilon), ignore_index, compute_dtype,
                                            chunk_rows, grad_enabled)


def batch_loss(model: Transformer, batch: Batch, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced summed label-smoothed loss and NLL of a batch. The output projection and the
    loss run together, chunk by chunk, and only where there is a target token (padding costs no
    vocabulary-sized matmul, and the (N, V) logits are never stored)."""
    hidden = model.decode_hidden(batch.tgt_in, model.encode(batch.src))  # (B, T, D)
    keep = batch.tgt_out != PAD_ID
    return linear_label_smoothed_loss(hidden[keep], model.output_weight, batch.tgt_out[keep], epsilon)
