"""mt.dropout (16 random bits per element from one 64-bit draw per four) and the spelled-out
attention that bf16/fp16 training uses on a CPU: the same statistics and gradients as the
reference implementations."""

from __future__ import annotations

import pytest
import torch

from mt.dropout import LEVELS, Dropout, dropout, keep_mask, residual_dropout
from mt.model import MultiHeadAttention


@pytest.mark.parametrize("p", [0.1, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_drops_p_of_the_elements_and_keeps_the_expectation(p, dtype):
    torch.manual_seed(0)
    x = torch.rand(1000, 1003).add_(0.5).to(dtype)  # an odd size: the 64-bit draws do not divide it
    y = dropout(x, p, training=True)
    dropped = round(p * LEVELS) / LEVELS
    kept = y != 0
    n = x.numel()
    sigma = (dropped * (1 - dropped) / n) ** 0.5
    assert abs((1 - kept.float().mean().item()) - dropped) < 5 * sigma
    torch.testing.assert_close(y[kept], x[kept] * (1 / (1 - dropped)), rtol=0, atol=0)  # as nn.Dropout rounds
    # the same rate in every quarter of the 64-bit words and across the tensor (no biased bits)
    rows = (~kept).float().view(-1)[: n // 4 * 4].view(-1, 4).mean(0)
    assert ((rows - dropped).abs() < 5 * (dropped * (1 - dropped) / (n / 4)) ** 0.5).all()
    assert abs(y.double().mean().item() - x.double().mean().item()) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_mask_is_the_16_bit_threshold_of_the_draw_written_in_the_dtype(dtype):
    shape, p = torch.Size([7, 13, 5]), 0.3  # 455 elements: the last 64-bit draw is used in part
    torch.manual_seed(11)
    mask, scale = keep_mask(shape, p, dtype)
    torch.manual_seed(11)  # the same draw, spelled out: 16 bits per element, kept above the threshold
    bits = torch.empty(114, dtype=torch.int64).random_(-(1 << 63), None).view(torch.int16)[:455].view(shape)
    dropped = round(p * LEVELS)
    kept = bits.long() + LEVELS // 2 >= dropped  # the bits as an unsigned 16-bit number in [0, 2¹⁶)
    factor = LEVELS / (LEVELS - dropped)
    assert mask.dtype == dtype and mask.shape == shape
    if dtype == torch.float32:  # the factor folded into the mask
        assert scale == 1.0 and torch.equal(mask, kept.float() * factor)
    else:  # 0/1, the factor apart (a rounded bf16 factor would bias the expectation)
        assert scale == factor and torch.equal(mask, kept.to(dtype))


def test_dropout_gradient_uses_the_forward_mask_and_the_seed_reproduces_it():
    x = torch.randn(64, 37, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, 0.2, training=True)
    g = torch.randn_like(y)
    y.backward(g)
    kept = y != 0
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))
    torch.testing.assert_close(x.grad[kept], g[kept] * (y[kept] / x[kept]), rtol=1e-6, atol=0)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.2, training=True), y)
    assert not torch.equal(dropout(x, 0.2, training=True), y)  # a fresh draw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_dropout_is_x_plus_dropout_of_y_with_the_same_mask_and_gradients(dtype):
    x = torch.randn(64, 37).to(dtype).requires_grad_()
    y = torch.randn(64, 37).to(dtype).requires_grad_()
    g = torch.randn(64, 37).to(dtype)
    torch.manual_seed(5)
    out = residual_dropout(x, y, 0.3, training=True)
    gx, gy = torch.autograd.grad(out, [x, y], g)
    torch.manual_seed(5)  # the same draw: the same mask
    dropped = dropout(y, 0.3, training=True)
    ref = x + dropped
    ref_gy, = torch.autograd.grad(dropped, [y], g)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:  # x + y·mask·scale rounded once to bf16 (the reference rounds y·scale, then the sum)
        exact = x.double() + dropped.ne(0).double() * y.double() / (1 - round(0.3 * LEVELS) / LEVELS)
        assert ((out.double() - exact).abs() <= exact.abs() * 2.0 ** -8 + 1e-30).all()
    assert torch.equal(gx, g)
    assert torch.equal(gy, ref_gy)
    assert ((out.float() - x.float()).abs() < 1e-6).float().mean().item() > 0.2  # ~30% of y dropped
    assert torch.equal(residual_dropout(x, y, 0.3, training=False), x + y)


def test_dropout_is_the_identity_in_eval_and_at_zero():
    x = torch.randn(5, 7)
    module = Dropout(0.5).eval()
    assert module(x) is x
    assert dropout(x, 0.0, training=True) is x
    assert torch.equal(dropout(x, 1.0, training=True), torch.zeros_like(x))


@pytest.mark.parametrize("kind", ["encoder", "causal", "cross"])
def test_bf16_attention_on_cpu_matches_fp32_sdpa_forward_and_backward(kind):
    """The CPU bf16 path (matmuls in bf16, softmax in fp32, padded keys masked) against SDPA in fp32
    on the same weights: outputs and every parameter's gradient within bf16 rounding."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=32, n_heads=4)
    x, memory = torch.randn(3, 7, 32), torch.randn(3, 9, 32)
    lengths = torch.tensor([9, 4, 1])  # a one-token source too
    key_mask = (torch.arange(9)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)

    def run(autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        mha.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if kind == "encoder":
                out = mha.self_attention(memory, key_mask=key_mask)
            elif kind == "causal":
                out = mha.self_attention(x, causal=True)
            else:
                out = mha.cross_attention(x, memory=memory, key_mask=key_mask)
        out.float().pow(2).sum().backward()
        return out.float(), [p.grad.clone() for p in mha.parameters()]

    out32, grads32 = run(False)
    out16, grads16 = run(True)
    assert out16.isfinite().all()
    scale = out32.abs().max()
    assert (out16 - out32).abs().max() < 0.03 * scale
    for g16, g32 in zip(grads16, grads32):
        assert (g16 - g32).abs().max() < 0.05 * g32.abs().max()
    if kind != "causal":  # padded keys change nothing on the bf16 path either
        changed = memory.clone()
        changed[1, 4:] = torch.randn(5, 32)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            a = mha.cross_attention(x, memory=memory, key_mask=key_mask)
            b = mha.cross_attention(x, memory=changed, key_mask=key_mask)
        assert torch.equal(a[1], b[1])


def test_attention_dropout_on_the_bf16_path_drops_weights():
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=16, n_heads=2, dropout=0.5).train()
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = mha.self_attention(x), mha.self_attention(x)
        mha.eval()
        c, d = mha.self_attention(x), mha.self_attention(x)
    assert not torch.equal(a, b)
    assert torch.equal(c, d)
