"""Greedy and beam search: equivalences (beam 1 = greedy, batched = alone, cache = no cache), n-best
order, length limits, and a model trained in-test on sequence reversal that beam search solves."""

import math

import pytest
import torch

from mt.config import ModelConfig
from mt.int8 import unavailable as int8_unavailable
from mt.batch import pad
from mt.model import Transformer
from mt.search import BLOCK, _top_candidates, beam_search, greedy_search
from mt.tokenizer import BOS_ID, EOS_ID
from tolerance import score_close, score_slack

VOCAB = 24  # ids 4..23 are symbols; 0-3 are <s> <pad> </s> <unk>


def reversal_batch(gen: torch.Generator, n: int, lo: int = 3, hi: int = 8) -> list[list[int]]:
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    return [torch.randint(4, VOCAB, (k,), generator=gen).tolist() for k in lengths]


@pytest.fixture(scope="module")
def reversal_model() -> Transformer:
    """A small Transformer taught to reverse sequences (it needs cross-attention to do it). The learning
    rate decays over the last 300 steps, so the model converges on every CPU (40/40 reversed under
    ATEN_CPU_CAPABILITY=default, avx2 and avx512, 1 or 2 threads; without the decay 37-40)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    cfg = ModelConfig(d_model=64, n_heads=4, ffn_dim=128, encoder_layers=2, decoder_layers=2, dropout=0.0,
                      max_positions=64)
    model = Transformer(cfg, VOCAB, VOCAB)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    for step in range(1, 801):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, step / 100, (800 - step) / 300 + 0.02)  # warmup, flat, decay
        seqs = reversal_batch(gen, 64)
        src = pad([s + [EOS_ID] for s in seqs])
        tgt = [list(reversed(s)) + [EOS_ID] for s in seqs]
        tgt_in, tgt_out = pad([[BOS_ID] + t[:-1] for t in tgt]), pad(tgt)
        logits = model(src, tgt_in)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def random_model() -> Transformer:
    torch.manual_seed(3)
    cfg = ModelConfig(d_model=32, n_heads=4, ffn_dim=64, encoder_layers=2, decoder_layers=2, dropout=0.0,
                      max_positions=128)
    return Transformer(cfg, 50, 50).eval()


def sources(n: int, seed: int, vocab: int = VOCAB, lo: int = 1, hi: int = 12) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [s + [EOS_ID] for s in reversal_batch(gen, n, lo, hi)] + [[EOS_ID]]  # and an empty sentence


def test_beam_search_reverses_sequences(reversal_model):
    srcs = sources(40, seed=123, lo=3, hi=8)[:-1]
    hyps = beam_search(reversal_model, pad(srcs), beam=5, max_len_a=1.0, max_len_b=5)
    right = sum(h[0].tokens == list(reversed(s[:-1])) for s, h in zip(srcs, hyps))
    assert right >= 37, f"only {right}/40 reversed correctly"


@pytest.mark.parametrize("model_name", ["reversal_model", "random_model"])
def test_beam_size_one_equals_greedy(model_name, request):
    model = request.getfixturevalue(model_name)
    src = pad(sources(30, seed=7))
    greedy = greedy_search(model, src, lenpen=0.7)
    beam1 = beam_search(model, src, beam=1, lenpen=0.7)
    for g, (b,) in zip(greedy, beam1):
        assert g.tokens == b.tokens
        assert g.score == score_close(b.score, len(b.tokens) + 1)
        assert g.model_score == score_close(b.model_score, len(b.tokens) + 1)


@pytest.mark.parametrize("model_name", ["reversal_model", "random_model"])
def test_batched_beam_equals_one_by_one(model_name, request):
    model = request.getfixturevalue(model_name)
    srcs = sources(25, seed=11)
    batched = beam_search(model, pad(srcs), beam=4, nbest=4, max_len_b=8)
    for src, hyps in zip(srcs, batched):
        alone = beam_search(model, pad([src]), beam=4, nbest=4, max_len_b=8)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]
        for h, a in zip(hyps, alone):
            assert h.score == score_close(a.score, len(a.tokens) + 1)
    greedy_batched = greedy_search(model, pad(srcs), max_len_b=8)
    for src, hyp in zip(srcs, greedy_batched):
        assert hyp.tokens == greedy_search(model, pad([src]), max_len_b=8)[0].tokens


@pytest.mark.parametrize("model_name", ["reversal_model", "random_model"])
def test_cache_gives_the_same_search_as_full_decoding(model_name, request):
    model = request.getfixturevalue(model_name)
    src = pad(sources(12, seed=5))
    with_cache = beam_search(model, src, beam=3, nbest=3)
    without = beam_search(model, src, beam=3, nbest=3, use_cache=False)
    for a, b in zip(with_cache, without):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        for x, y in zip(a, b):
            assert x.score == score_close(y.score, len(y.tokens) + 1)
    assert [h.tokens for h in greedy_search(model, src)] == [h.tokens for h in greedy_search(model, src, use_cache=False)]


def test_nbest_sorted_and_top_equals_one_best(random_model):
    src = pad(sources(10, seed=2, vocab=50))
    nbest = beam_search(random_model, src, beam=5, nbest=5, lenpen=1.0)
    best = beam_search(random_model, src, beam=5, nbest=1, lenpen=1.0)
    for hyps, (top,) in zip(nbest, best):
        assert len(hyps) == 5
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert hyps[0].tokens == top.tokens
        assert len({tuple(h.tokens) for h in hyps}) == 5  # distinct hypotheses
        for h in hyps:  # the reported score is the model score normalised by length (</s> counted)
            assert h.score == pytest.approx(h.model_score / (len(h.tokens) + 1), abs=1e-5)


def test_model_score_is_the_sum_of_token_log_probabilities(reversal_model):
    src = pad(sources(5, seed=9)[:-1])
    hyps = beam_search(reversal_model, src, beam=3, lenpen=0.0)
    for i, (h,) in enumerate(hyps):
        tgt = h.tokens + [EOS_ID]
        with torch.no_grad():
            lprobs = torch.log_softmax(reversal_model(src[i: i + 1], torch.tensor([[BOS_ID] + tgt[:-1]])), -1)
        expected = lprobs[0, torch.arange(len(tgt)), torch.tensor(tgt)].sum().item()
        assert h.model_score == score_close(expected, len(tgt))


def test_beam_finds_at_least_the_greedy_score(reversal_model):
    src = pad(sources(30, seed=21))
    for lenpen in (0.0, 1.0):
        greedy = greedy_search(reversal_model, src, lenpen=lenpen)
        beam = beam_search(reversal_model, src, beam=5, lenpen=lenpen)
        for g, (b,) in zip(greedy, beam):
            assert b.score >= g.score - score_slack(g.score, len(g.tokens) + 1)


def test_length_limits(random_model):
    srcs = sources(8, seed=4, vocab=50)
    src = pad(srcs)
    for hyps in beam_search(random_model, src, beam=3, max_len_a=0.0, max_len_b=3, nbest=3):
        assert all(len(h.tokens) + 1 <= 3 for h in hyps)
    for h in greedy_search(random_model, src, max_len_a=0.0, max_len_b=3):
        assert len(h.tokens) + 1 <= 3
    for hyps in beam_search(random_model, src, beam=3, min_len=6, max_len_b=20):
        assert len(hyps[0].tokens) >= 6
    for h in greedy_search(random_model, src, min_len=6, max_len_b=20):
        assert len(h.tokens) >= 6
    # a = 1, b = 0: at most as many tokens as the source (its </s> included)
    for s, (h,) in zip(srcs, beam_search(random_model, src, beam=2, max_len_a=1.0, max_len_b=0)):
        assert len(h.tokens) + 1 <= len(s)


def test_beam_wider_than_the_vocabulary():
    """K > V: the first step cannot run one row per sentence (too few candidates), so all K start."""
    torch.manual_seed(4)
    cfg = ModelConfig(d_model=16, n_heads=2, ffn_dim=32, encoder_layers=1, decoder_layers=1, dropout=0.0,
                      max_positions=64)
    model = Transformer(cfg, 6, 6).eval()  # ids 4 and 5 are the only symbols
    srcs = [[4, 5, EOS_ID], [5, EOS_ID], [EOS_ID]]
    batched = beam_search(model, pad(srcs), beam=8, nbest=8, max_len_b=4)
    for src, hyps in zip(srcs, batched):
        assert hyps and all(t not in (BOS_ID, 1, EOS_ID) for h in hyps for t in h.tokens)
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
        alone = beam_search(model, pad([src]), beam=8, nbest=8, max_len_b=4)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]


@pytest.mark.parametrize("V", [8 * BLOCK, 8 * BLOCK + 1])  # two stages by vocabulary blocks; one stage
def test_top_candidates_equal_a_top_k_over_all_continuations(V):
    gen = torch.Generator().manual_seed(0)
    B, W, k = 6, 4, 8
    lprobs = torch.log_softmax(torch.randn(B * W, V, generator=gen) * 3, dim=-1)
    lprobs[:, 1] = -math.inf
    lprobs[W: 2 * W, : V // 2] = -math.inf  # a sentence whose candidates crowd into few blocks
    scores = -torch.rand(B, W, generator=gen) * 4
    scores[0, 1:] = -math.inf  # a sentence with one live hypothesis
    top, row, token = _top_candidates(lprobs, scores, k)
    brute, index = (scores.view(-1, 1) + lprobs).view(B, W * V).topk(k, dim=1)
    assert torch.equal(top, brute)
    assert torch.equal(row, index // V) and torch.equal(token, index % V)
    assert torch.equal(top, scores.gather(1, row) + lprobs.view(B, W, V)[torch.arange(B)[:, None], row, token])


def test_two_stage_top_k_search_equals_one_stage(monkeypatch):
    """With a vocabulary of 5 blocks the search takes candidates by blocks; with a block size that
    does not divide it, by whole rows. Same hypotheses, same scores, alone or batched, cached or not."""
    import mt.search

    torch.manual_seed(4)
    cfg = ModelConfig(d_model=32, n_heads=4, ffn_dim=64, encoder_layers=1, decoder_layers=2, dropout=0.0,
                      max_positions=64)
    model = Transformer(cfg, 5 * BLOCK, 5 * BLOCK).eval()
    src = pad(sources(6, seed=9, vocab=5 * BLOCK))
    def same(xs, ys):
        assert [[h.tokens for h in n] for n in xs] == [[h.tokens for h in n] for n in ys]
        for x, y in zip((h for n in xs for h in n), (h for n in ys for h in n)):
            assert x.model_score == score_close(y.model_score, len(y.tokens) + 1)

    blocks = beam_search(model, src, beam=4, nbest=2)
    same(beam_search(model, src[2:3], beam=4, nbest=2), [blocks[2]])
    same(beam_search(model, src, beam=4, nbest=2, use_cache=False), blocks)
    monkeypatch.setattr(mt.search, "BLOCK", 7)  # 320 % 7 != 0: one stage
    same(beam_search(model, src, beam=4, nbest=2), blocks)
    assert len({tuple(n[0].tokens) for n in blocks}) > 3  # the sentences really differ


def test_nbest_larger_than_beam_is_refused(random_model):
    with pytest.raises(ValueError, match="nbest"):
        beam_search(random_model, pad(sources(2, seed=0)), beam=2, nbest=3)


def test_scores_are_finite_for_empty_source(random_model):
    (hyps,) = beam_search(random_model, pad([[EOS_ID]]), beam=4, nbest=4)
    assert len(hyps) == 4 and all(math.isfinite(h.score) for h in hyps)


needs_int8 = pytest.mark.skipif(bool(int8_unavailable()), reason=int8_unavailable() or "-")


@needs_int8
def test_int8_linear_is_close_to_fp32_and_its_row_blocks_match():
    from mt.int8 import Int8Linear

    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 32, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(3, 5, 32, generator=gen)  # (B, T, D): leading dimensions are kept
    layer = Int8Linear(weight, bias)
    exact = torch.nn.functional.linear(x, weight, bias)
    y = layer(x)
    assert y.shape == (3, 5, 96) and y.dtype == torch.float32
    assert (y - exact).abs().max() <= 0.03 * exact.abs().max()  # 8-bit error, not a different function
    assert not torch.equal(y, exact)  # it really is quantized
    torch.testing.assert_close(layer.rows(x, 32), y[..., 32:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.rows(x, 0, 32), y[..., :32], rtol=1e-5, atol=1e-5)
    # one activation scale per row: a row's result does not depend on the other rows
    loud = torch.cat([x[:1], 100 * x[1:]])
    torch.testing.assert_close(layer(loud)[0], y[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x[:1, 2:3])[0, 0], y[0, 2], rtol=0, atol=1e-6)


@needs_int8
def test_int8_model_replaces_every_linear_and_still_reverses(reversal_model):
    import copy

    from mt.int8 import Int8Linear, quantize_int8

    model = quantize_int8(copy.deepcopy(reversal_model))
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert isinstance(model.output_proj, Int8Linear)  # the tied output projection too
    src = pad(sources(40, seed=123, lo=3, hi=8)[:-1])
    tgt_in = torch.full((src.shape[0], 1), BOS_ID)
    with torch.no_grad():
        exact, fast = reversal_model(src, tgt_in), model(src, tgt_in)
    assert (fast.softmax(-1) - exact.softmax(-1)).abs().max() < 0.05  # probabilities, to 8-bit error
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.95
    hyps = beam_search(model, src, beam=5, max_len_a=1.0, max_len_b=5)
    fp32 = beam_search(reversal_model, src, beam=5, max_len_a=1.0, max_len_b=5)
    assert sum(a[0].tokens == b[0].tokens for a, b in zip(hyps, fp32)) >= 38
    with_cache, without = beam_search(model, src, beam=3), beam_search(model, src, beam=3, use_cache=False)
    assert sum(a[0].tokens == b[0].tokens for a, b in zip(with_cache, without)) >= 38


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_batched_beam_equals_one_by_one_in_every_dtype_auto_can_choose(reversal_model, dtype):
    """bf16 weights and activations, or int8 linear layers: a sentence's hypotheses do not depend on
    the batch it is in (bf16 GEMMs round per element, int8 scales are per token)."""
    import copy

    from mt.int8 import quantize_int8

    if dtype == "int8" and int8_unavailable():
        pytest.skip(int8_unavailable())
    model = copy.deepcopy(reversal_model)
    model = model.to(torch.bfloat16) if dtype == "bf16" else quantize_int8(model)
    srcs = sources(25, seed=11)
    batched = beam_search(model, pad(srcs), beam=4, nbest=2, max_len_b=8)
    for src, hyps in zip(srcs, batched):
        alone = beam_search(model, pad([src]), beam=4, nbest=2, max_len_b=8)[0]
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]

