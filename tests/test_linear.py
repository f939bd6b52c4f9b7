"""mt.linear: fp32 products through oneDNN equal PyTorch's own (MKL) ones, forward and backward, and
the library is chosen from the CPU alone."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mt import linear as L
from mt.config import ModelConfig
from mt.loss import linear_label_smoothed_loss
from mt.model import Transformer

needs_onednn = pytest.mark.skipif(L._onednn_op() is None, reason="this PyTorch has no oneDNN linear")


@pytest.fixture
def gemm(monkeypatch):
    """Set MT_FP32_GEMM for the test (the choice is cached per process: cleared around it)."""
    def use(name: str | None) -> None:
        if name is None:
            monkeypatch.delenv(L.ENV, raising=False)
        else:
            monkeypatch.setenv(L.ENV, name)
        L.fp32_gemm.cache_clear()
    yield use
    L.fp32_gemm.cache_clear()


def _cpuinfo(tmp_path: Path, vendor: str, flags: str) -> Path:
    path = tmp_path / f"cpuinfo-{vendor}-{len(flags)}"
    path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: fpu sse2 {flags}\n\n")
    return path


@needs_onednn
def test_choice_follows_the_cpu_and_the_environment(tmp_path, gemm):
    gemm(None)
    assert L.fp32_gemm(_cpuinfo(tmp_path, "AuthenticAMD", "avx2 avx512f avx512_bf16"))[0] == "onednn"
    assert L.fp32_gemm(_cpuinfo(tmp_path, "AuthenticAMD", "avx2"))[0] == "mkl"
    assert L.fp32_gemm(_cpuinfo(tmp_path, "GenuineIntel", "avx2 avx512f amx_bf16"))[0] == "mkl"
    assert L.fp32_gemm(tmp_path / "missing")[0] == "mkl"
    gemm("mkl")
    assert L.fp32_gemm(_cpuinfo(tmp_path, "AuthenticAMD", "avx512f")) == ("mkl", "MT_FP32_GEMM=mkl")
    gemm("onednn")
    assert L.fp32_gemm(_cpuinfo(tmp_path, "GenuineIntel", "avx2"))[0] == "onednn"
    gemm("blas")
    with pytest.raises(L.GemmError, match="MT_FP32_GEMM='blas' in the environment: choose onednn or mkl"):
        L.fp32_gemm(_cpuinfo(tmp_path, "GenuineIntel", "avx2x"))


@needs_onednn
@pytest.mark.parametrize("shape", [(37, 24), (3, 11, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_and_backward_equal_torch(gemm, shape, bias):
    gemm("onednn")
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    grad = torch.randn(*shape[:-1], 40)
    out = L.linear(x, w, b)
    assert out.grad_fn is not None and "_Linear" in type(out.grad_fn).__name__  # oneDNN's path was taken
    grads = torch.autograd.grad(out, [x, w] + ([b] if bias else []), grad)
    ref_out = F.linear(x, w, b)
    ref = torch.autograd.grad(ref_out, [x, w] + ([b] if bias else []), grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)
    with torch.no_grad():  # no graph: the product alone
        torch.testing.assert_close(L.linear(x, w.t().contiguous().t(), b), ref_out, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_mm_equals_torch_in_every_layout(gemm):
    gemm("onednn")
    torch.manual_seed(1)
    h, w, g = torch.randn(50, 16), torch.randn(300, 16), torch.randn(50, 300)
    for a, b in ((h, w.t()), (g, w), (g.t(), h)):
        torch.testing.assert_close(L.mm(a, b), torch.mm(a, b), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_other_dtypes_and_autocast_keep_torch(gemm):
    gemm("onednn")
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    assert "_Linear" not in type(L.linear(x.bfloat16(), w.bfloat16()).grad_fn).__name__
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = L.linear(x, w)
    assert out.dtype == torch.bfloat16  # autocast applied, as with F.linear


@needs_onednn
def test_a_training_step_and_a_translation_match_across_libraries(gemm, monkeypatch):
    """The whole model: loss, every parameter's gradient and the logits of a step agree between
    oneDNN and MKL to float rounding; with oneDNN every product of the step goes through it."""
    products = []
    real = L._product
    monkeypatch.setattr(L, "_product", lambda *a: products.append(a[0].shape) or real(*a))
    cfg = ModelConfig(d_model=32, n_heads=4, ffn_dim=64, encoder_layers=2, decoder_layers=2, dropout=0.0)
    torch.manual_seed(2)
    model = Transformer(cfg, 50, 50)
    src = torch.randint(4, 50, (3, 7))
    tgt = torch.randint(4, 50, (3, 6))
    results = {}
    for name in ("mkl", "onednn"):
        gemm(name)
        model.zero_grad()
        hidden = model.decode_hidden(tgt[:, :-1], model.encode(src))
        loss, _ = linear_label_smoothed_loss(hidden.reshape(-1, 32), model.output_weight, tgt[:, 1:].reshape(-1), 0.1)
        loss.backward()
        with torch.no_grad():
            logits = model(src, tgt[:, :-1])
        results[name] = (loss.detach(), logits, {n: p.grad.clone() for n, p in model.named_parameters()})
        results[name + " products"] = len(products)
        products.clear()
    (loss_m, logits_m, grads_m), (loss_o, logits_o, grads_o) = results["mkl"], results["onednn"]
    torch.testing.assert_close(loss_o, loss_m, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_o, logits_m, rtol=1e-5, atol=1e-5)
    for n in grads_m:
        torch.testing.assert_close(grads_o[n], grads_m[n], rtol=1e-4, atol=1e-5, msg=n)
    # 22 linears (4 per encoder layer; 7 per decoder layer, cross-attention's query and key/value
    # projections apart), each forward and for the input's and the weight's gradient; the loss's one
    # chunk: logits, hidden and weight gradients; the logits pass: the 22 and the output projection
    assert results["mkl products"] == 0
    assert results["onednn products"] == 3 * 22 + 3 + 23


@needs_onednn
def test_prepacked_layers_equal_the_plain_ones(gemm):
    gemm("onednn")
    torch.manual_seed(3)
    w, b = torch.randn(48, 16), torch.randn(48)
    layer = L.Prepacked(w, b)
    for rows in (1, 7, 600):  # far from and beyond the rows the layout was chosen for
        x = torch.randn(rows, 2, 16)
        torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.rows(x, 16, 32), F.linear(x, w[16:32], b[16:32]), rtol=1e-5, atol=1e-5)
    assert set(layer._packed) == {(None, None), (16, 32)}  # each block reordered once


@needs_onednn
@pytest.mark.skipif(not L.onednn_bf16(), reason="oneDNN computes no bf16 on this CPU")
def test_prepacked_bf16_model_translates_as_the_plain_one_whatever_the_fp32_library(gemm):
    """bf16 models are prepacked whichever library fp32 products take (oneDNN computes bf16 on the
    CPU), and their padded rows change no hypothesis."""
    from mt.search import beam_search

    cfg = ModelConfig(d_model=32, n_heads=4, ffn_dim=64, encoder_layers=2, decoder_layers=2, dropout=0.0)
    torch.manual_seed(5)
    model = Transformer(cfg, 60, 60).eval().to(torch.bfloat16)
    src = torch.randint(4, 60, (5, 9))
    src[3, 5:] = 1  # padding
    plain = beam_search(model, src, beam=4, nbest=2)
    gemm("mkl")
    assert L.prepack(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    packed = beam_search(model, src, beam=4, nbest=2)
    assert [[h.tokens for h in n] for n in packed] == [[h.tokens for h in n] for n in plain]


def test_prepack_translates_as_the_plain_model(gemm):
    """Every linear layer (the tied output projection too) becomes Prepacked; beam search gives the
    same hypotheses; fp32 models only with oneDNN's fp32 products."""
    from mt.search import beam_search

    cfg = ModelConfig(d_model=32, n_heads=4, ffn_dim=64, encoder_layers=2, decoder_layers=2, dropout=0.0)
    torch.manual_seed(4)
    model = Transformer(cfg, 60, 60).eval()
    src = torch.randint(4, 60, (5, 9))
    src[3, 5:] = 1  # padding
    gemm("onednn")
    plain = beam_search(model, src, beam=4, nbest=2)
    gemm("mkl")
    assert not L.prepack(model)
    gemm("onednn")
    assert L.prepack(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.output_proj, L.Prepacked)
    assert not L.prepack(model)  # once
    packed = beam_search(model, src, beam=4, nbest=2)
    assert [[h.tokens for h in n] for n in packed] == [[h.tokens for h in n] for n in plain]
    for n_p, n_q in zip(packed, plain):
        for p, q in zip(n_p, n_q):
            assert abs(p.model_score - q.model_score) < 1e-4
