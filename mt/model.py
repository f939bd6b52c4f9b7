"""The Transformer encoder-decoder (Vaswani et al., 2017, "Attention Is All You Need").

Written from torch primitives. One ``MultiHeadAttention`` module serves three roles:

* encoder self-attention — bidirectional; padded source keys are masked;
* decoder self-attention — causal: position t attends to positions <= t only;
* decoder cross-attention — queries from the decoder, keys/values from the encoder output.

All three compute softmax(QKᵀ/√d_head)·V with ``F.scaled_dot_product_attention`` on a GPU; on a
CPU, whose SDPA kernel is slow at sentence lengths, with batched products (``_SmallAttention`` in
fp32, written out in bf16), and a decoding step's attention over its cache with two small matmuls. The defaults are
the layout of Hugging Face ``M2M100ForConditionalGeneration`` (and fairseq's pre-norm Transformer):
pre-norm sub-layers with a final LayerNorm after each stack, token embeddings scaled by √d_model,
sinusoidal positions whose first token sits at position ``PAD_ID + 1`` (= 2), ReLU, attention
projections with biases, shared embeddings and an output projection without bias.

The decoder has an incremental API for search: ``init_cache`` computes the cross-attention keys and
values once per source; each ``decode`` call with the cache appends the new positions'
self-attention keys/values; ``DecoderCache.reorder_beams`` follows the beams and ``select_sentences``
drops finished sentences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mt.config import ModelConfig
from mt.dropout import Dropout, dropout
from mt.linear import Linear, linear
from mt.tokenizer import PAD_ID

POSITION_OFFSET = PAD_ID + 1  # M2M100/fairseq: positions count from padding_idx + 1


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim) table: row p is [sin(p·ω_0..ω_{h-1}), cos(p·ω_0..ω_{h-1})], h = dim // 2,
    ω_i = 10000^(-i/(h-1)) (the tensor2tensor/fairseq/M2M100 layout, not interleaved)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float) * -(math.log(10000.0) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float)[:, None] * freqs[None, :]  # (P, half)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    table[PAD_ID] = 0.0  # the padding position (never used for real tokens)
    return table


@dataclass
class EncoderOut:
    memory: torch.Tensor  # (B, S, D) encoder output
    src_mask: torch.Tensor  # (B, S) True at real (non-pad) source tokens


class PackedLinear(Linear):
    """The packed input projection [W_q; W_k; W_v] (3D, D). ``rows`` applies one block of it alone:
    cross-attention projects queries and keys/values from different inputs."""

    def rows(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        return linear(x, self.weight[start:stop], self.bias[start:stop])


def _split_heads(x: torch.Tensor, n: int, heads: int) -> tuple[torch.Tensor, ...]:
    """(B, T, n·H·hd) -> n views (B, H, T, hd)."""
    B, T, _ = x.shape
    x = x.view(B, T, n, heads, x.shape[-1] // (n * heads)).permute(2, 0, 3, 1, 4)  # (n, B, H, T, hd)
    return x.unbind(0)


class _SplitHeads(torch.autograd.Function):
    """``_split_heads`` whose backward copies the n gradients (B, H, T, hd) once each into the
    (B, T, n·H·hd) gradient of x: autograd's own (of unbind, permute and view) stacks them, then copies
    the stack again to undo the permutation, two passes over it instead of one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, heads: int) -> tuple[torch.Tensor, ...]:
        ctx.shape, ctx.n, ctx.heads = x.shape, n, heads
        return _split_heads(x, n, heads)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        grad = grads[0].new_empty(ctx.shape)  # (B, T, n·D)
        for part, g in zip(_split_heads(grad, ctx.n, ctx.heads), grads):
            part.copy_(g)  # (B, H, T, hd) views of the gradient
        return grad, None, None


class MultiHeadAttention(nn.Module):
    """Multi-head attention with one packed input projection [W_q; W_k; W_v] of shape (3D, D)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout = dropout
        self.in_proj = PackedLinear(d_model, 3 * d_model)
        self.out_proj = Linear(d_model, d_model)
        self.recorder: list[torch.Tensor] | None = None  # set by mt.attention to keep the weights

    def _heads(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        """(B, T, n·D) -> n tensors of (B, H, T, hd) (views of x)."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _SplitHeads.apply(x, n, self.n_heads)
        return _split_heads(x, n, self.n_heads)

    def _attend(self, q, k, v, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        # SDPA's CPU flash kernel is slow at these lengths: spelled out when mt.attention reads the
        # weights and in bf16/fp16 (forward + backward of a 2,048-token batch's attention 15.7 ms
        # against 1.8 ms, AVX512-BF16, 2 threads), ``_SmallAttention`` in fp32 without attention dropout.
        if self.recorder is not None or (q.device.type == "cpu" and q.dtype != torch.float32):
            weights = attention_weights(q, k, mask, causal)  # (B, H, T, S)
            if self.recorder is not None:
                self.recorder.append(weights)
            weights = dropout(weights, self.dropout, self.training)
            return self._merge(torch.matmul(weights.to(v.dtype), v))
        if (q.device.type == "cpu" and q.dtype == torch.float32 and (self.dropout == 0.0 or not self.training)
                and (mask is None or (mask.dim() == 4 and mask.shape[2] == 1))):
            return self._merge(_SmallAttention.apply(q, k, v, mask, causal))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hd)
        return self._merge(out)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, T, hd) -> output projection of the concatenated heads (B, T, D)."""
        B, _, T, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.d_model))

    def self_attention(self, x: torch.Tensor, *, key_mask: torch.Tensor | None = None, causal: bool = False,
                       cache: LayerCache | None = None) -> torch.Tensor:
        """x (B, T, D). ``key_mask`` (B, 1, 1, T) bool, True = attend. With ``cache``, x holds the next
        positions of a causal sequence and attends to the cached prefix too."""
        q, k, v = self._heads(self.in_proj(x), 3)  # each (B, H, T, hd)
        if cache is None:
            return self._attend(q, k, v, key_mask, causal)
        past = cache.append(k, v)
        k, v = cache.keys(), cache.values()  # (B, H, past + T, hd), in the cache's dtype (see cross_kv)
        T = q.shape[2]
        if T == 1 and not self.training:  # a decoding step
            return self._merge(_attend_small(q, k.transpose(-1, -2), v))
        k, v = k.to(q.dtype), v.to(q.dtype)
        if T == 1 or not causal:
            return self._attend(q, k, v, None, False)
        if past == 0:
            return self._attend(q, k, v, None, True)
        # new positions past..past+T-1 see the whole cached prefix and themselves causally
        mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        return self._attend(q, k, v, mask, False)

    def cross_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values from the encoder output, laid out for decoding steps: (B, S, D) -> keys
        transposed (B, H, hd, S) and values (B, H, S, hd), both contiguous, so that every step
        multiplies by them without copying."""
        k, v = self._heads(self.in_proj.rows(memory, self.d_model), 2)  # (B, H, S, hd) each
        if memory.device.type == "cpu":
            # a decoding step's attention runs in fp32 on a CPU (``_attend_small``): the keys and values
            # are kept in fp32 there, this layer's self-attention cache too (``LayerCache``), so that
            # no step converts them, and no step's product has a new shape for oneDNN, which computes
            # bf16 products and builds a kernel for each shape (the cache's length grows every step)
            k, v = k.float(), v.float()
        return k.transpose(-1, -2).contiguous(), v.contiguous()

    def cross_attention(self, x: torch.Tensor, *, memory: torch.Tensor | None = None,
                        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                        key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries from x (B, T, D); keys/values from ``memory`` (B, S, D) or from ``kv`` computed
        once by ``cross_kv`` for N sentences. With N < B, x holds B / N beams per source sentence
        (sentence-major rows): the beams become extra query positions of their sentence, so K/V
        are never copied per beam."""
        (q,) = self._heads(self.in_proj.rows(x, 0, self.d_model), 1)  # (B, H, T, hd)
        if kv is None:
            k, v = self._heads(self.in_proj.rows(memory, self.d_model), 2)  # (B, H, S, hd) each
            return self._attend(q, k, v, key_mask, False)
        keys_t, v = kv  # (N, H, hd, S), (N, H, S, hd)
        N = v.shape[0]
        if N == 0 or self.training:  # training with a cache: one row per sentence
            return self._attend(q, keys_t.transpose(-1, -2).to(q.dtype), v.to(q.dtype), key_mask, False)
        B, H, T, hd = q.shape
        beams = B // N
        q = q.view(N, beams, H, T, hd).transpose(1, 2).reshape(N, H, beams * T, hd)  # (N, H, K·T, hd)
        bias = None if key_mask is None else torch.zeros(key_mask.shape, device=q.device).masked_fill_(
            ~key_mask, torch.finfo(torch.float32).min)  # (N, 1, 1, S)
        out = _attend_small(q, keys_t, v, bias)  # (N, H, K·T, hd)
        out = out.view(N, H, beams, T, hd).transpose(1, 2).reshape(B, H, T, hd)  # (B, H, T, hd)
        return self._merge(out)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """softmax(q kᵀ/√d), (B, H, T, S), for q (B, H, T, hd) and k (B, H, S, hd): the product in q's
    dtype, the softmax in fp32 (as HF's eager attention does under autocast). ``mask``
    broadcastable to (B, H, T, S), True = attend; ``causal``: position t sees keys <= t. Masked keys
    get weight exactly 0 (a row with no key at all gets uniform weights, not NaN)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(q.shape[-1] ** -0.5)  # (B, H, T, S)
    _hide_keys(scores, mask, causal)
    return softmax(scores)


SOFTMAX_WIDTH = 16  # PyTorch's CPU softmax loops element by element over a last dimension narrower than this


def softmax(x: torch.Tensor) -> torch.Tensor:
    """``x.softmax(-1)``. On a CPU a last dimension of 2-15 is padded to ``SOFTMAX_WIDTH`` with -inf
    first (the result is a view of the padded one): PyTorch's kernel takes those widths element by
    element, and attention over short sentences and a decoding step's first positions meets them
    all the time (2,560 rows of 15: 343 us against 56 padded; the backward 143 against 7 at 16;
    AMD EPYC Zen 4, 2 threads)."""
    n = x.shape[-1]
    if x.device.type != "cpu" or not 1 < n < SOFTMAX_WIDTH:
        return x.softmax(-1)
    return F.pad(x, (0, SOFTMAX_WIDTH - n), value=-math.inf).softmax(-1)[..., :n].contiguous()


def _softmax_backward(grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The gradient of the scores of ``weights`` = softmax(scores) given ``grad`` of the weights,
    padded like ``softmax`` (with zeros, which add nothing to its sums)."""
    n = weights.shape[-1]
    if weights.device.type != "cpu" or not 1 < n < SOFTMAX_WIDTH:
        return torch._softmax_backward_data(grad, weights, -1, weights.dtype)
    pad = (0, SOFTMAX_WIDTH - n)
    return torch._softmax_backward_data(F.pad(grad, pad), F.pad(weights, pad), -1, weights.dtype)[..., :n]


def _hide_keys(scores: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor | None:
    """Set fp32 ``scores`` (B, H, T, S) to the lowest float, in place, where a key is hidden: outside
    ``mask`` (broadcastable, True = attend) or, ``causal``, after the query's position. Returns the
    mask of hidden keys (broadcastable to the scores), or None when none is."""
    T, S = scores.shape[-2:]
    hidden = ~torch.ones(T, S, dtype=torch.bool, device=scores.device).tril() if causal else None  # (T, S)
    if mask is not None:
        hidden = ~mask if hidden is None else hidden | ~mask
    if hidden is not None:
        scores.masked_fill_(hidden, torch.finfo(torch.float32).min)
    return hidden


def _attend_small(q: torch.Tensor, keys_t: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ/√d + bias)·v with two batched matmuls, no dropout: q (B, H, T, hd), the keys
    transposed ``keys_t`` = kᵀ (B, H, hd, L), v (B, H, L, hd), bias (fp32) broadcastable to
    (B, H, T, L). Scores and softmax in fp32, as SDPA keeps them; the result in q's dtype. For the
    few query positions of a decoding step this is 1.5-4x faster than SDPA's CPU kernel (measured at
    850 rows, 2 threads)."""
    scores = torch.matmul(q.float(), keys_t.float()).mul_(q.shape[-1] ** -0.5)  # (B, H, T, L)
    if bias is not None:
        scores = scores.add_(bias)
    return torch.matmul(softmax(scores).to(v.dtype), v).to(q.dtype)  # (B, H, T, hd)


class _SmallAttention(torch.autograd.Function):
    """softmax(q kᵀ/√d, masked)·v for fp32 on a CPU, with the gradients written out: q (B, H, T, hd),
    k and v (B, H, S, hd) (any strides, e.g. views of a packed projection), ``key_mask`` (B, 1, 1, S)
    bool (True = attend) or None, ``causal``: position t sees keys <= t. At sentence lengths (T, S
    ~10-50) each head's products are tiny; this runs them as 3-d batched products on contiguous
    (B·H, ·, ·) copies, which MKL takes in one call, where SDPA's flash kernel (and ``torch.matmul``
    on 4-d views, which goes matrix by matrix) spends most of its time on bookkeeping. Forward and
    backward of one self-attention of a 2,048-token batch (128 x 16): 3.4 ms against SDPA's 7.3
    (medians of 10; AMD EPYC Zen 4, 2 threads); fp32 training tokens/s +3.5-4.5% (8 alternating
    rounds in one process). Masked keys get weight exactly 0 (a row without any key gets uniform
    weights and no gradient, not NaN), as in ``attention_weights``."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                causal: bool) -> torch.Tensor:
        B, H, T, hd = q.shape
        S = k.shape[2]
        qs = torch.mul(q, hd ** -0.5, out=q.new_empty(B, H, T, hd)).view(B * H, T, hd)  # scaled, contiguous
        kc = k.contiguous().view(B * H, S, hd)
        vc = v.contiguous().view(B * H, S, hd)
        scores = torch.bmm(qs, kc.transpose(1, 2))  # (B·H, T, S)
        hidden = _hide_keys(scores.view(B, H, T, S), key_mask, causal)  # (B or 1, 1, T or 1, S) or None
        weights = softmax(scores)  # (B·H, T, S)
        ctx.save_for_backward(qs, kc, vc, weights, hidden)
        ctx.shape = (B, H, T, S, hd)
        return torch.bmm(weights, vc).view(B, H, T, hd)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qs, kc, vc, weights, hidden = ctx.saved_tensors
        B, H, T, S, hd = ctx.shape
        grad = grad.contiguous().view(B * H, T, hd)  # (B·H, T, hd); bmm multiplies other layouts one by one
        grad_v = torch.bmm(weights.transpose(1, 2), grad)  # (B·H, S, hd)
        grad_w = torch.bmm(grad, vc.transpose(1, 2))  # (B·H, T, S)
        grad_s = _softmax_backward(grad_w, weights)  # (B·H, T, S)
        if hidden is not None and _hides_a_whole_row(hidden):
            grad_s.view(B, H, T, S).masked_fill_(hidden, 0.0)  # masked scores are constants
        grad_q = torch.bmm(grad_s, kc).mul_(hd ** -0.5)  # (B·H, T, hd)
        grad_k = torch.bmm(grad_s.transpose(1, 2), qs)  # (B·H, S, hd)
        return (grad_q.view(B, H, T, hd), grad_k.view(B, H, S, hd), grad_v.view(B, H, S, hd), None, None)


def _hides_a_whole_row(hidden: torch.Tensor) -> bool:
    """Whether some row of a (..., T or 1, S) mask of hidden keys hides every key."""
    return bool(hidden.all(-1).any())


def _bf16_stream() -> bool:
    """bf16 autocast on the CPU: the residual stream is then kept in bf16 between the layers (see
    ``LayerNorm``), so that the element-wise work between the matmuls (residual adds, dropout, layer
    norms, the casts autocast would make around every fp32 LayerNorm) moves half the bytes: on an AMD
    EPYC with AVX512-BF16, 6,255 -> 6,925 training tokens/s as sums of per-batch minima over 10
    alternating in-process rounds (medians +3%; 2,048-token batches). As in Megatron-LM's bf16
    training; parameters, gradients and the optimizer stay fp32."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (the same parameters) that, on a bf16 input under bf16 CPU autocast, returns
    bf16: the statistics and the affine map computed in fp32 with the fp32 weights (PyTorch's
    mixed-dtype CPU kernel), the output rounded once. Autocast would return fp32, to be cast back to
    bf16 by the next matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _bf16_stream():
            with torch.autocast("cpu", enabled=False):
                return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return super().forward(x)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, activation: str, activation_dropout: float):
        super().__init__()
        self.fc1 = Linear(d_model, ffn_dim)
        self.fc2 = Linear(ffn_dim, d_model)
        self.activation = F.relu if activation == "relu" else F.gelu
        self.dropout = Dropout(activation_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.activation(self.fc1(x))))


class Sublayer(nn.Module):
    """Residual connection around a sub-layer with LayerNorm before (pre-norm) or after (post-norm)."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm = LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, fn) -> torch.Tensor:
        if self.pre_norm:
            return self.dropout.residual(x, fn(self.norm(x)))
        return self.norm(self.dropout.residual(x, fn(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pre = cfg.norm == "pre"
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation, cfg.activation_dropout)
        self.attn_block = Sublayer(cfg.d_model, cfg.dropout, pre)
        self.ffn_block = Sublayer(cfg.d_model, cfg.dropout, pre)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attn_block(x, lambda h: self.self_attn.self_attention(h, key_mask=key_mask))
        return self.ffn_block(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pre = cfg.norm == "pre"
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation, cfg.activation_dropout)
        self.self_block = Sublayer(cfg.d_model, cfg.dropout, pre)
        self.cross_block = Sublayer(cfg.d_model, cfg.dropout, pre)
        self.ffn_block = Sublayer(cfg.d_model, cfg.dropout, pre)

    def forward(self, x: torch.Tensor, *, memory: torch.Tensor | None, key_mask: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = self.self_block(x, lambda h: self.self_attn.self_attention(h, causal=True, cache=cache))
        kv = cache.cross if cache is not None else None
        x = self.cross_block(x, lambda h: self.cross_attn.cross_attention(h, memory=memory, kv=kv,
                                                                           key_mask=key_mask))
        return self.ffn_block(x, self.ffn)


class LayerCache:
    """One decoder layer's incremental state: the cross-attention K/V computed once per source
    sentence, and the self-attention K/V of every row (``beam`` rows per sentence) for the decoded
    positions.

    Self-attention K/V are one contiguous (2, R, H, L, hd) tensor (keys, values) of exactly the
    decoded length L, never a slice of a longer buffer: a decoding step's attention multiplies by
    them as they are, and the CPU's batched products over slices of a longer buffer run 1.6-4.5x
    slower (MKL through ``torch.matmul``, L = 16-32, capacities 1.25-4x L, two microbenchmarks on 2
    threads of an AMD EPYC Zen 4). Selecting rows (beams following their parents, finished
    sentences leaving) is only recorded; the next ``append`` gathers the selected rows and adds its
    T new positions in one copy into a tensor T positions longer (``keys``/``values`` gather them
    too, when asked first). Two flat buffers, used in turn and grown geometrically, hold these
    tensors, so a step allocates no new memory once they are large enough; a tensor
    ``keys``/``values`` returned is therefore a view that the next append but one overwrites."""

    def __init__(self, cross: tuple[torch.Tensor, torch.Tensor], beam: int = 1):
        self.cross = cross  # keys transposed (N, H, hd, S), values (N, H, S, hd)
        N, H, _, hd = cross[1].shape
        self.rows = N * beam
        self._storage = [cross[1].new_empty(0), cross[1].new_empty(0)]
        self._kv = self._storage[0].new_empty(2, self.rows, H, 0, hd)  # (2, R, H, L, hd)
        self._active = 0  # the storage that holds self._kv (after the first append)
        self._pending: torch.Tensor | None = None  # (R,) rows of self._kv that the rows continue

    @property
    def beam(self) -> int:
        """Rows per sentence."""
        N = self.cross[0].shape[0]
        return self.rows // N if N else 0

    @property
    def length(self) -> int:
        return self._kv.shape[3]

    def _renewed(self, extra: int) -> torch.Tensor:
        """The selected rows and ``extra`` new positions, in the spare storage: (2, R, H, L + extra, hd)
        with the first L positions filled."""
        _, _, H, L, hd = self._kv.shape
        shape = (2, self.rows, H, L + extra, hd)
        spare = 1 - self._active
        numel = math.prod(shape)
        if self._storage[spare].numel() < numel:
            self._storage[spare] = self._kv.new_empty(max(numel, 2 * self._storage[spare].numel()))
        out = self._storage[spare][:numel].view(shape)
        if L:
            if self._pending is None:
                out[:, :, :, :L] = self._kv
            else:
                torch.index_select(self._kv, 1, self._pending, out=out[:, :, :, :L])
        self._kv, self._active, self._pending = out, spare, None
        return out

    def append(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Store k, v (R, H, T, hd) after the cached positions; return the previous length."""
        past = self.length
        kv = self._renewed(k.shape[2])
        kv[0, :, :, past:] = k
        kv[1, :, :, past:] = v
        return past

    def keys(self) -> torch.Tensor:
        """(R, H, L, hd), a view of a buffer (see the class): clone it to keep it."""
        if self._pending is not None:
            self._renewed(0)
        return self._kv[0]  # (R, H, L, hd)

    def values(self) -> torch.Tensor:
        """(R, H, L, hd), a view of a buffer (see the class): clone it to keep it."""
        if self._pending is not None:
            self._renewed(0)
        return self._kv[1]

    def select_rows(self, rows: torch.Tensor) -> None:
        """From now on row i holds the self-attention state of row ``rows[i]`` (repeats allowed; more
        rows than before branch into beams). Copied at the next ``append`` (or ``keys``/``values``);
        ``rows`` is kept until then and must not change."""
        self._pending = rows if self._pending is None else self._pending[rows]
        self.rows = rows.shape[0]

    def select_sentences(self, index: torch.Tensor) -> None:
        """Keep sentences ``index`` (N',) with all their beams, in that order."""
        beam = self.beam
        self.cross = (self.cross[0].index_select(0, index), self.cross[1].index_select(0, index))
        self.select_rows(sentence_rows(index, beam))


def sentence_rows(index: torch.Tensor, beam: int) -> torch.Tensor:
    """Row indices (N'·beam,) of sentences ``index`` (N',) in a sentence-major (N·beam) layout."""
    return ((index * beam)[:, None] + torch.arange(beam, device=index.device)).view(-1)


class DecoderCache:
    """Incremental decoding state of the whole decoder (see ``Transformer.init_cache``). Rows are
    sentence-major: row r holds beam r % beam of sentence r // beam."""

    def __init__(self, layers: list[LayerCache], src_mask: torch.Tensor):
        self.layers = layers
        self.src_mask = src_mask  # (N, S)

    @property
    def beam(self) -> int:
        """Rows per sentence."""
        return self.layers[0].beam

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reorder_beams(self, rows: torch.Tensor) -> None:
        """Row i continues from row ``rows[i]``, which must belong to the same sentence (beam search);
        ``rows`` lists the same number of rows for every sentence, e.g. K copies of a sentence's one
        row to branch into K beams."""
        for layer in self.layers:
            layer.select_rows(rows)

    def select_sentences(self, index: torch.Tensor) -> None:
        """Keep sentences ``index`` (N',), in that order (drop finished ones, reorder a batch)."""
        for layer in self.layers:
            layer.select_sentences(index)
        self.src_mask = self.src_mask.index_select(0, index)

    def reorder(self, index: torch.Tensor) -> None:
        """One row per sentence (beam 1): keep rows ``index``, in that order."""
        if self.beam != 1:
            raise ValueError("reorder() is for beam 1; use reorder_beams / select_sentences")
        self.select_sentences(index)


class Transformer(nn.Module):
    """Encoder-decoder with ``encode`` / ``decode`` / ``forward`` (Annotated-Transformer style)."""

    def __init__(self, cfg: ModelConfig, src_vocab: int, tgt_vocab: int, *, joint: bool = True):
        """``joint``: source and target share one vocabulary (then, with ``cfg.share_embeddings``, one
        embedding serves source, target and output)."""
        super().__init__()
        self.cfg = cfg
        self.src_vocab, self.tgt_vocab = src_vocab, tgt_vocab
        D = cfg.d_model
        self.embed_scale = math.sqrt(D) if cfg.scale_embedding else 1.0
        self.tgt_embed = nn.Embedding(tgt_vocab, D, padding_idx=PAD_ID)
        shared_src = cfg.share_embeddings and joint and src_vocab == tgt_vocab
        self.src_embed = self.tgt_embed if shared_src else nn.Embedding(src_vocab, D, padding_idx=PAD_ID)
        self.register_buffer("positions", sinusoidal_table(cfg.max_positions + POSITION_OFFSET, D),
                             persistent=False)
        self.dropout = Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        pre = cfg.norm == "pre"
        self.encoder_norm = LayerNorm(D) if pre else nn.Identity()
        self.decoder_norm = LayerNorm(D) if pre else nn.Identity()
        self.output_proj = None if cfg.share_embeddings else Linear(D, tgt_vocab, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fairseq's initialisation: Xavier-uniform projections, zero biases, N(0, D^-½) embeddings."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for emb in [self.tgt_embed] if self.src_embed is self.tgt_embed else [self.src_embed, self.tgt_embed]:
            nn.init.normal_(emb.weight, mean=0.0, std=self.cfg.d_model ** -0.5)
            with torch.no_grad():
                emb.weight[PAD_ID].zero_()
        if self.output_proj is not None:
            nn.init.normal_(self.output_proj.weight, mean=0.0, std=self.cfg.d_model ** -0.5)

    def _embed(self, embedding: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """ids (B, T) -> (B, T, D): scaled token embedding + position embedding (positions start..);
        in bf16 under bf16 CPU autocast (the residual stream, ``_bf16_stream``)."""
        T = ids.shape[1]
        if start + T > self.cfg.max_positions:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_positions={self.cfg.max_positions}")
        pos = self.positions[POSITION_OFFSET + start: POSITION_OFFSET + start + T]  # (T, D)
        x = embedding(ids) * self.embed_scale + pos
        if ids.device.type == "cpu" and _bf16_stream():
            x = x.to(torch.bfloat16)
        return self.dropout(x)

    def encode(self, src: torch.Tensor) -> EncoderOut:
        """src (B, S) ids, right-padded -> memory (B, S, D) and the source mask."""
        src_mask = src != PAD_ID  # (B, S)
        key_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(self.src_embed, src)
        for layer in self.encoder_layers:
            x = layer(x, key_mask)
        return EncoderOut(memory=self.encoder_norm(x), src_mask=src_mask)

    def decode_hidden(self, tgt_in: torch.Tensor, enc: EncoderOut | None = None, *,
                      cache: DecoderCache | None = None) -> torch.Tensor:
        """tgt_in (B, T) -> decoder states (B, T, D). With ``cache``, tgt_in continues the cached prefix
        (and ``enc`` is not needed: its keys/values live in the cache)."""
        start = cache.length if cache is not None else 0
        src_mask = cache.src_mask if cache is not None else enc.src_mask
        key_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        memory = enc.memory if enc is not None and cache is None else None
        x = self._embed(self.tgt_embed, tgt_in, start)
        for i, layer in enumerate(self.decoder_layers):
            x = layer(x, memory=memory, key_mask=key_mask, cache=cache.layers[i] if cache is not None else None)
        return self.decoder_norm(x)

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection (V, D): the target embedding when they are tied."""
        return self.tgt_embed.weight if self.output_proj is None else self.output_proj.weight

    def replace_linears(self, make) -> None:
        """For inference (mt.int8), in place: every ``nn.Linear`` becomes
        ``make(weight, bias)``, and a tied output projection gets one of its own,
        ``make(target embedding, None)``."""
        self.eval()
        for module in list(self.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, make(child.weight, child.bias))
        if self.output_proj is None:
            self.output_proj = make(self.tgt_embed.weight, None)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder states (..., D) -> logits (..., V)."""
        if self.output_proj is not None:  # untied, or replaced for inference (replace_linears)
            return self.output_proj(hidden)
        return linear(hidden, self.tgt_embed.weight)

    def decode(self, tgt_in: torch.Tensor, enc: EncoderOut | None = None, *,
               cache: DecoderCache | None = None) -> torch.Tensor:
        """tgt_in (B, T) -> logits (B, T, V)."""
        return self.project(self.decode_hidden(tgt_in, enc, cache=cache))

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, V) for src (B, S) and decoder input tgt_in (B, T)."""
        return self.decode(tgt_in, self.encode(src))

    def init_cache(self, enc: EncoderOut, beam: int = 1) -> DecoderCache:
        """Start incremental decoding of ``beam`` rows per source sentence: cross-attention K/V from
        ``enc`` (once per sentence), an empty self-attention state (one per row)."""
        layers = [LayerCache(layer.cross_attn.cross_kv(enc.memory), beam) for layer in self.decoder_layers]
        return DecoderCache(layers, enc.src_mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
