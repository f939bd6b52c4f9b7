"""Label-smoothed cross-entropy (Szegedy et al., 2016) for teacher-forced translation.

The smoothed target puts 1 - ε on the reference token and ε/V on every class (the reference
included), so per token

    loss = (1 - ε)·(-log p_y) + (ε/V)·Σ_v(-log p_v)        (= ``F.cross_entropy(label_smoothing=ε)``)

Two implementations of the same value:

* ``label_smoothed_loss`` on given logits (N, V): the reference, used on small inputs and in tests.
* ``linear_label_smoothed_loss`` on decoder states (N, D) and the output projection (V, D): the
  projection, the softmax and the gradient are computed together, block by block of at most
  ``BLOCK_ELEMENTS`` logits (one 2,048-token batch of an 8k vocabulary is one block), so that memory
  holds one block, never the (N, V) logits of a large batch. A block's logits are made by one product;
  the softmax, the loss and the gradient then go over them ``CACHE_ROWS`` rows at a time on a CPU
  (a GPU takes the block at once), in fp32 while those rows are in the core's cache, and write the
  gradient over the logits, in place; two more products give the gradients of the states and of the
  projection. Where a plain softmax streams N·V floats through memory five times (forward,
  log-softmax, NLL, backward), this reads and writes them once between the products: on a 2-core
  Xeon, whose memory streams ~10 GB/s, a (512, 8,000) fp32 log-softmax takes 4.5 ms from memory
  against 1.5 ms from cache. The gradient is
  known in the forward pass (the loss is a sum), so it is computed there and only scaled in backward
  (the approach of Liger-Kernel's fused linear cross-entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from typing import TYPE_CHECKING

from mt.linear import ROW_QUANTUM, mm
from mt.tokenizer import PAD_ID

if TYPE_CHECKING:
    from mt.batch import Batch
    from mt.model import Transformer

BLOCK_ELEMENTS = 1 << 24  # logits per block (32 MB in bf16, 64 MB in fp32: 2,080 rows of an 8k vocabulary)
CACHE_ROWS = 32  # rows of a block taken through softmax and gradient at a time on a CPU (1 MB in fp32 at 8k)
# Blocks have a multiple of ROW_QUANTUM rows (mt.linear's), a last one padded up to it: oneDNN builds a
# kernel for each new matrix shape, 12-24 ms for a (n, 256) x (256, 8,000) product on a Xeon with AMX,
# and a block of any size would take new ones almost every batch.


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
    """loss, nll = LS-CE(hidden @ weightᵀ, target), block by block; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, epsilon: float,
                ignore_index: int, compute_dtype: torch.dtype, block_rows: int, grad_enabled: bool):
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
        for start in range(0, N, block_rows):
            stop = min(start + block_rows, N)
            h_rows, t = h[start:stop], target[start:stop]  # (n, D), (n,)
            n = stop - start
            padded = min(block_rows, -(-n // ROW_QUANTUM) * ROW_QUANTUM)
            if padded > n:  # zero rows with ignored targets: they add nothing, and the shape is one of few
                h_rows = torch.cat([h_rows, h_rows.new_zeros(padded - n, h_rows.shape[1])])
                t = torch.cat([t, t.new_full((padded - n,), ignore_index)])
            keep = (t != ignore_index)[:, None]  # (n, 1)
            safe_t = t.masked_fill(~keep[:, 0], 0)[:, None]  # (n, 1): ignored rows point anywhere
            logits = mm(h_rows, w.t()).contiguous()  # (n, V); becomes the gradient, rows in place
            step = CACHE_ROWS if logits.device.type == "cpu" else padded  # a GPU: the block at once
            # the chunks holding ignored rows (the block's padding), whose gradient rows must be zeroed
            ignored = ((~keep[:, 0]).nonzero()[:, 0].div(step, rounding_mode="floor").unique().tolist()
                       if need_hidden or need_weight else [])
            for r in range(0, padded, step):
                rows = slice(r, r + step)
                x = logits[rows]  # (c, V)
                # fp32 logits are overwritten by their log-softmax (bf16 ones by the gradient, below)
                log_probs = torch.log_softmax(x, 1, out=x) if x.dtype == torch.float32 else x.float().log_softmax(1)
                k, y = keep[rows], safe_t[rows]  # (c, 1) each
                token_nll = -log_probs.gather(1, y).masked_fill_(~k, 0.0)  # (c, 1)
                smooth = -log_probs.sum(1, keepdim=True).masked_fill_(~k, 0.0)  # (c, 1): Σ_v -log p_v
                nll += token_nll.sum()
                loss += (1.0 - epsilon) * token_nll.sum() + (epsilon / V) * smooth.sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                # d loss / d logits = softmax - smoothed target, zero on ignored rows
                grad = log_probs.exp_()
                grad.scatter_add_(1, y, grad.new_full(y.shape, -(1.0 - epsilon))).sub_(epsilon / V)
                if r // step in ignored:
                    grad.mul_(k)
                if grad.data_ptr() != x.data_ptr():  # bf16: the fp32 gradient goes back into the block
                    x.copy_(grad)
            if grad_hidden is not None:
                grad_hidden[start:stop] = mm(logits, w)[:n]  # (n, D)
            if grad_weight is not None:
                grad_weight += mm(logits.t(), h_rows)  # (V, D), accumulated in fp32
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
                               block_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed CE and summed NLL of the logits ``hidden @ weight.T`` without forming them.

    hidden (N, D), weight (V, D), target (N,). Under autocast the matmuls run in the autocast dtype
    (softmax and sums in fp32), as they would for ``F.linear`` followed by ``label_smoothed_loss``.
    ``block_rows``: rows per block (0: a multiple of ``ROW_QUANTUM``, as many as fit ``BLOCK_ELEMENTS``
    logits).
    """
    block_rows = block_rows or max(BLOCK_ELEMENTS // weight.shape[0] // ROW_QUANTUM * ROW_QUANTUM, ROW_QUANTUM)
    device = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    grad_enabled = torch.is_grad_enabled()  # always off inside forward: ask here
    with torch.autocast(device, enabled=False):
        return _LinearLabelSmoothedCE.apply(hidden, weight, target, float(epsilon), ignore_index, compute_dtype,
                                            block_rows, grad_enabled)


def batch_loss(model: Transformer, batch: Batch, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced summed label-smoothed loss and NLL of a batch. The output projection and the
    loss run together, block by block, and only where there is a target token (padding costs no
    vocabulary-sized matmul, and the (N, V) logits are never stored)."""
    hidden = model.decode_hidden(batch.tgt_in, model.encode(batch.src))  # (B, T, D)
    keep = batch.tgt_out != PAD_ID
    return linear_label_smoothed_loss(hidden[keep], model.output_weight, batch.tgt_out[keep], epsilon)
