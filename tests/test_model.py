"""The Transformer: masking, causality, incremental decoding, embeddings, positions, attention maths."""

from __future__ import annotations

import math

import pytest
import torch

from mt.config import ModelConfig
from mt.model import POSITION_OFFSET, EncoderOut, MultiHeadAttention, Transformer, sentence_rows, sinusoidal_table
from mt.tokenizer import BOS_ID, EOS_ID, PAD_ID

V = 40
# batched = alone, cached = full: the values compared are layer-normed states and a random model's
# logits, |x| < 6, where 1e-5 is > 20 ulps of fp32: room for any CPU's summation order
ATOL = 1e-5


def small_config(**changes) -> ModelConfig:
    values = dict(d_model=32, n_heads=4, ffn_dim=64, encoder_layers=2, decoder_layers=2, dropout=0.1,
                  max_positions=64)
    values.update(changes)
    return ModelConfig(**values)


def make_model(seed: int = 0, src_vocab: int = V, tgt_vocab: int = V, **changes) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(small_config(**changes), src_vocab, tgt_vocab)
    model.eval()
    return model


def sentence(gen: torch.Generator, length: int, vocab: int = V) -> list[int]:
    """``length`` real tokens (ids >= 4) followed by </s>."""
    return torch.randint(4, vocab, (length,), generator=gen).tolist() + [EOS_ID]


def pad(seqs: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(seqs), max(map(len, seqs))), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


@pytest.fixture(scope="module")
def model() -> Transformer:
    return make_model()


@pytest.fixture(scope="module")
def batch():
    """Three sources of different lengths (so two rows are padded) and decoder inputs of length 9."""
    gen = torch.Generator().manual_seed(1)
    srcs = [sentence(gen, n) for n in (6, 2, 10)]
    tgt_in = torch.cat([torch.full((3, 1), BOS_ID), torch.randint(4, V, (3, 8), generator=gen)], dim=1)
    return srcs, pad(srcs), tgt_in


@torch.no_grad()
def test_padding_does_not_change_encoder_or_decoder_outputs(model, batch):
    srcs, src, tgt_in = batch
    assert (src == PAD_ID).any(), "the batch must contain padding for this test to mean anything"
    enc = model.encode(src)
    assert enc.src_mask.tolist() == [[i < len(s) for i in range(src.shape[1])] for s in srcs]
    logits = model.decode(tgt_in, enc)
    for i, s in enumerate(srcs):
        alone = model.encode(torch.tensor([s]))
        torch.testing.assert_close(enc.memory[i, : len(s)], alone.memory[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[i], model.decode(tgt_in[i: i + 1], alone)[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_padding_on_the_target_side_does_not_change_real_positions(model, batch):
    _, src, tgt_in = batch
    short = tgt_in[:, :5]
    padded = torch.cat([short, torch.full((3, 4), PAD_ID)], dim=1)
    enc = model.encode(src)
    torch.testing.assert_close(model.decode(padded, enc)[:, :5], model.decode(short, enc), atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("t", [1, 4, 8])
def test_decoder_is_causal(model, batch, t):
    _, src, tgt_in = batch
    enc = model.encode(src)
    changed = tgt_in.clone()
    changed[:, t] = torch.where(tgt_in[:, t] == 5, 6, 5)
    before, after = model.decode(tgt_in, enc), model.decode(changed, enc)
    torch.testing.assert_close(after[:, :t], before[:, :t], atol=1e-6, rtol=0)
    # every position from t on sees the changed token, in every sentence
    diff = (after[:, t:] - before[:, t:]).abs().amax(dim=-1)  # (B, T - t)
    assert (diff > 1e-4).all(), diff


@torch.no_grad()
def test_encoder_is_bidirectional(model, batch):
    """The encoder is not causal: changing the last source token changes the first position's state."""
    _, src, _ = batch
    changed = src.clone()
    changed[2, 8] = 5 if src[2, 8] != 5 else 6
    diff = (model.encode(changed).memory[2, 0] - model.encode(src).memory[2, 0]).abs().max()
    assert diff > 1e-4


@torch.no_grad()
def test_incremental_decoding_one_token_at_a_time_equals_full_decoding(model, batch):
    _, src, tgt_in = batch
    enc = model.encode(src)
    full = model.decode(tgt_in, enc)
    cache = model.init_cache(enc)  # the state grows on the way
    steps = [model.decode(tgt_in[:, t: t + 1], cache=cache) for t in range(tgt_in.shape[1])]
    assert cache.length == tgt_in.shape[1]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("chunks", [(3, 4, 1, 1), (1, 5, 3), (9,)])
def test_incremental_decoding_in_chunks_equals_full_decoding(model, batch, chunks):
    _, src, tgt_in = batch
    assert sum(chunks) == tgt_in.shape[1]
    enc = model.encode(src)
    full = model.decode(tgt_in, enc)
    cache = model.init_cache(enc)
    out, start = [], 0
    for n in chunks:
        out.append(model.decode(tgt_in[:, start: start + n], cache=cache))
        start += n
    torch.testing.assert_close(torch.cat(out, dim=1), full, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("index", [[2, 0, 0, 1], [1, 2], [2], [0, 2], [2, 1], [0, 1]])
def test_cache_reorder_then_continue_equals_full_decoding_of_reordered_batch(model, batch, index):
    _, src, tgt_in = batch
    index = torch.tensor(index)
    enc = model.encode(src)
    cache = model.init_cache(enc)
    model.decode(tgt_in[:, :4], cache=cache)
    cache.reorder(index)
    assert cache.src_mask.shape[0] == len(index)
    rest = [model.decode(tgt_in[index, t: t + 1], cache=cache) for t in range(4, tgt_in.shape[1])]
    full = model.decode(tgt_in[index], model.encode(src[index]))
    torch.testing.assert_close(torch.cat(rest, dim=1), full[:, 4:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_branches_one_row_into_beams_then_drops_a_sentence(model, batch):
    """Beam search's first step runs one row per sentence, then branches each into K beams."""
    _, src, tgt_in = batch
    B, K = src.shape[0], 3
    enc = model.encode(src)
    cache = model.init_cache(enc)
    first = model.decode(tgt_in[:, :1], cache=cache)
    rows = torch.arange(B).repeat_interleave(K)  # (B·K,) sentence-major
    cache.reorder_beams(rows)
    assert cache.beam == K and cache.length == 1
    cont = torch.randint(4, V, (B * K, 3), generator=torch.Generator().manual_seed(5))  # each beam its own tokens
    steps = [model.decode(cont[:, t: t + 1], cache=cache) for t in range(2)]
    cache.select_sentences(torch.arange(1, B))  # the first sentence is done
    assert cache.beam == K
    last = model.decode(cont[K:, 2:3], cache=cache)
    full = model.decode(torch.cat([tgt_in[rows, :1], cont], dim=1), EncoderOut(enc.memory[rows], enc.src_mask[rows]))
    torch.testing.assert_close(first[rows], full[:, :1], atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 1:3], atol=ATOL, rtol=0)
    torch.testing.assert_close(last, full[K:, 3:4], atol=ATOL, rtol=0)
    cache.select_sentences(torch.zeros(0, dtype=torch.long))  # all done: an empty step still works
    assert model.decode(torch.zeros(0, 1, dtype=torch.long), cache=cache).shape == (0, 1, V)


@torch.no_grad()
@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4, 5], [0, 1, 1, 3, 4, 5], [0, 0, 2, 3, 3, 5], [1, 0, 2, 5, 4, 3],
                                  [2, 2, 2, 3, 3, 3]])
def test_beam_reorder_gathers_the_rows_into_a_contiguous_state(model, batch, rows):
    """After reorder_beams every layer's keys/values are those of the rows asked for, contiguous
    (a decoding step multiplies by them as they are), and decoding continues as for those rows."""
    _, src, tgt_in = batch
    src, tgt_in, K = src[:2], tgt_in[:2], 3
    enc = model.encode(src)
    cache = model.init_cache(enc, beam=K)
    beams = tgt_in.repeat_interleave(K, dim=0)  # (2·K, T)
    beams[:, 2] = torch.arange(4, 4 + 2 * K)  # every row its own prefix
    model.decode(beams[:, :3], cache=cache)
    keys = [layer.keys().clone() for layer in cache.layers]
    rows = torch.tensor(rows)
    cache.reorder_beams(rows)
    for layer, before in zip(cache.layers, keys):
        assert layer.keys().is_contiguous() and layer.values().is_contiguous()
        torch.testing.assert_close(layer.keys(), before[rows], atol=0, rtol=0)
    out = model.decode(beams[rows, 3:5], cache=cache)
    full = model.decode(beams[rows, :5], EncoderOut(enc.memory[rows // K], enc.src_mask[rows // K]))
    torch.testing.assert_close(out, full[:, 3:5], atol=ATOL, rtol=0)


@torch.no_grad()
def test_branching_then_reordering_then_several_positions_at_once(model, batch):
    """Branch 3 rows into 3x6, reorder, then decode 3 positions in one call: the selections made
    before an append are gathered with it, and the state grows to the new rows and positions."""
    _, src, tgt_in = batch
    B, K = 3, 6
    enc = model.encode(src)
    cache = model.init_cache(enc)
    model.decode(tgt_in[:, :1], cache=cache)
    cache.reorder_beams(torch.arange(B).repeat_interleave(K))
    cont = torch.randint(4, V, (B * K, 4), generator=torch.Generator().manual_seed(6))
    model.decode(cont[:, :1], cache=cache)
    rows = torch.arange(B * K)
    rows[[1, 2, 7, 13]] = torch.tensor([0, 0, 6, 12])
    cache.reorder_beams(rows)
    out = model.decode(cont[rows, 1:4], cache=cache)
    assert cache.length == 5 and all(layer.keys().shape[:3] == (B * K, model.cfg.n_heads, 5) for layer in cache.layers)
    prefix = torch.cat([tgt_in.repeat_interleave(K, dim=0)[:, :1], cont[:, :1]], dim=1)[rows]
    rows_src = torch.arange(B).repeat_interleave(K)
    full = model.decode(torch.cat([prefix, cont[rows, 1:4]], dim=1),
                        EncoderOut(enc.memory[rows_src], enc.src_mask[rows_src]))
    torch.testing.assert_close(out, full[:, 2:5], atol=ATOL, rtol=0)


@torch.no_grad()
def test_a_reorder_and_a_dropped_sentence_before_one_step_compose(model, batch):
    """Beam search reorders the beams, then drops finished sentences, both before the next step:
    the cache applies both selections (one gather) and keeps every beam of the sentences kept."""
    _, src, tgt_in = batch
    src, tgt_in = torch.cat([src, src[:2]]), torch.cat([tgt_in, tgt_in[:2]])  # 5 sentences
    K, index = 2, torch.tensor([0, 1, 2, 4])
    enc = model.encode(src)
    cache = model.init_cache(enc, beam=K)
    beams = tgt_in.repeat_interleave(K, dim=0)
    beams[:, 2] = torch.arange(4, 4 + 5 * K)  # every row its own prefix
    model.decode(beams[:, :3], cache=cache)
    swap = torch.arange(5 * K).view(5, K).flip(1).reshape(-1)  # every sentence's beams swap rows
    cache.reorder_beams(swap)
    cache.select_sentences(index)
    assert cache.beam == K and cache.layers[0].cross[1].shape[0] == 4
    rows = swap[sentence_rows(index, K)]
    out = model.decode(beams[rows, 3:6], cache=cache)
    full = model.decode(beams[rows, :6], EncoderOut(enc.memory[rows // K], enc.src_mask[rows // K]))
    torch.testing.assert_close(out, full[:, 3:6], atol=ATOL, rtol=0)


@torch.no_grad()
def test_branching_into_beams_and_dropping_a_sentence_before_the_next_step(model, batch):
    """Beam search's first step can both branch every sentence into K beams and end one (a length
    limit of 1): both selections apply at the next append."""
    _, src, tgt_in = batch
    B, K, index = src.shape[0], 3, torch.tensor([0, 2])
    enc = model.encode(src)
    cache = model.init_cache(enc)
    model.decode(tgt_in[:, :1], cache=cache)
    cache.reorder_beams(torch.arange(B).repeat_interleave(K))
    cache.select_sentences(index)
    assert cache.beam == K and cache.layers[0].rows == 2 * K
    cont = torch.randint(4, V, (2 * K, 2), generator=torch.Generator().manual_seed(8))
    out = model.decode(cont, cache=cache)
    rows = index.repeat_interleave(K)
    full = model.decode(torch.cat([tgt_in[rows, :1], cont], dim=1), EncoderOut(enc.memory[rows], enc.src_mask[rows]))
    torch.testing.assert_close(out, full[:, 1:3], atol=ATOL, rtol=0)


@torch.no_grad()
def test_decoding_steps_stop_allocating_once_the_buffers_are_large_enough(model, batch):
    """The state lives in two flat buffers, used in turn, that grow geometrically: 24 steps of one
    position reallocate them only a few times, and none in the last steps."""
    _, src, _ = batch
    cache = model.init_cache(model.encode(src), beam=2)
    tokens = torch.randint(4, V, (2 * src.shape[0], 24), generator=torch.Generator().manual_seed(7))
    layer = cache.layers[0]
    swap = torch.arange(2 * src.shape[0]).view(-1, 2).flip(1).reshape(-1)  # the beams of each sentence swap
    buffers = {}  # every buffer the layer used, kept alive so that no two share an id
    counts = []
    for t in range(24):
        model.decode(tokens[:, t: t + 1], cache=cache)
        assert layer.keys().data_ptr() == layer._storage[layer._active].data_ptr()  # the state is in a buffer
        cache.reorder_beams(swap)
        buffers.update((id(b), b) for b in layer._storage)
        counts.append(len(buffers))
    assert cache.length == 24 and counts[-1] <= 12
    assert counts[18] == counts[-1]  # lengths 19-24 fit the buffers that length 18 made


@torch.no_grad()
def test_empty_source_sentence(model):
    gen = torch.Generator().manual_seed(3)
    srcs = [[EOS_ID], sentence(gen, 5)]
    src = pad(srcs)
    tgt_in = torch.tensor([[BOS_ID, 7, 8, 9], [BOS_ID, 10, 11, 12]])
    enc = model.encode(src)
    logits = model.decode(tgt_in, enc)
    assert torch.isfinite(enc.memory).all() and torch.isfinite(logits).all()
    alone = model.encode(torch.tensor([[EOS_ID]]))
    torch.testing.assert_close(enc.memory[0, :1], alone.memory[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[0], model.decode(tgt_in[:1], alone)[0], atol=ATOL, rtol=0)
    # and incrementally, too
    cache = model.init_cache(enc)
    steps = torch.cat([model.decode(tgt_in[:, t: t + 1], cache=cache) for t in range(4)], dim=1)
    assert torch.isfinite(steps).all()
    torch.testing.assert_close(steps, logits, atol=ATOL, rtol=0)


def test_joint_vocabulary_shares_all_embeddings():
    model = make_model(src_vocab=V, tgt_vocab=V)
    assert model.src_embed is model.tgt_embed
    assert model.output_proj is None
    names = [name for name, _ in model.named_parameters()]
    assert not any("output_proj" in n for n in names)
    hidden = torch.randn(2, 3, 32)
    torch.testing.assert_close(model.project(hidden), hidden @ model.tgt_embed.weight.T)
    assert model.project(torch.zeros(1, 32)).abs().max() == 0  # no output bias
    # the tie is real: a gradient through the projection reaches the (shared) embedding
    model.project(hidden).sum().backward()
    assert model.tgt_embed.weight.grad is not None and model.tgt_embed.weight.grad.abs().sum() > 0
    assert model.tgt_embed.weight[PAD_ID].abs().sum() == 0  # the padding row starts at zero


def test_separate_vocabularies_get_a_separate_source_embedding():
    model = make_model(src_vocab=30, tgt_vocab=V)
    assert model.src_embed is not model.tgt_embed
    assert model.src_embed.num_embeddings == 30 and model.tgt_embed.num_embeddings == V
    assert model.output_proj is None  # target embedding and output projection are still tied
    hidden = torch.randn(2, 32)
    torch.testing.assert_close(model.project(hidden), hidden @ model.tgt_embed.weight.T)
    with torch.no_grad():
        logits = model(torch.tensor([[29, 4, EOS_ID]]), torch.tensor([[BOS_ID, 39]]))
    assert logits.shape == (1, 2, V)


def test_no_sharing_uses_an_output_projection_without_bias():
    model = make_model(share_embeddings=False)
    assert model.src_embed is not model.tgt_embed
    assert isinstance(model.output_proj, torch.nn.Linear) and model.output_proj.bias is None
    hidden = torch.randn(2, 32)
    torch.testing.assert_close(model.project(hidden), hidden @ model.output_proj.weight.T)


@pytest.mark.parametrize("src_vocab,tgt_vocab,share", [(30, V, True), (V, V, False)])
def test_initialisation_is_reproducible_with_separate_source_embedding(src_vocab, tgt_vocab, share):
    """Same seed, same model. (Builds many models so that object addresses vary between them.)"""
    reference = make_model(seed=0, src_vocab=src_vocab, tgt_vocab=tgt_vocab, share_embeddings=share).state_dict()
    kept = []
    for _ in range(12):
        kept.append(make_model(seed=0, src_vocab=src_vocab, tgt_vocab=tgt_vocab, share_embeddings=share))
        state = kept[-1].state_dict()
        differing = [k for k in reference if not torch.equal(reference[k], state[k])]
        assert not differing, (
            f"same seed, different initial weights in {differing}: Transformer.reset_parameters iterates "
            "over the set {src_embed, tgt_embed}, whose order depends on object ids")


@pytest.mark.parametrize("dim", [32, 16, 10])
def test_sinusoidal_table_values(dim):
    table = sinusoidal_table(50, dim)
    half = dim // 2
    assert table.shape == (50, dim)
    assert table[PAD_ID].abs().sum() == 0
    for i in (0, 1, 5, 30):
        row = POSITION_OFFSET + i
        pos = 2 + i
        assert row == PAD_ID + 1 + i
        freqs = [10000 ** (-k / (half - 1)) for k in range(half)]
        expected = [math.sin(pos * f) for f in freqs] + [math.cos(pos * f) for f in freqs]
        torch.testing.assert_close(table[row], torch.tensor(expected), atol=2e-5, rtol=0)
    # spot checks written out: position 2, first and last frequency
    assert table[POSITION_OFFSET, 0].item() == pytest.approx(math.sin(2.0), abs=1e-6)
    assert table[POSITION_OFFSET, half].item() == pytest.approx(math.cos(2.0), abs=1e-6)
    assert table[POSITION_OFFSET, half - 1].item() == pytest.approx(math.sin(2.0 / 10000), abs=1e-6)
    assert table[POSITION_OFFSET, dim - 1 if dim % 2 == 0 else dim - 2].item() == pytest.approx(
        math.cos(2.0 / 10000), abs=1e-6)


@torch.no_grad()
def test_embeddings_scale_tokens_and_add_positions_from_offset(model):
    ids = torch.tensor([[5, 6, 7, EOS_ID]])
    x = model._embed(model.src_embed, ids)  # eval mode: no dropout
    table = sinusoidal_table(10, 32)
    expected = model.src_embed.weight[ids[0]] * math.sqrt(32) + table[POSITION_OFFSET: POSITION_OFFSET + 4]
    torch.testing.assert_close(x[0], expected)
    # a continued sequence (start=3) uses the positions after the prefix
    y = model._embed(model.tgt_embed, ids[:, 3:], start=3)
    torch.testing.assert_close(y[0, 0], model.tgt_embed.weight[EOS_ID] * math.sqrt(32) + table[POSITION_OFFSET + 3])


@torch.no_grad()
def test_post_norm_runs_and_differs_from_pre_norm(batch):
    _, src, tgt_in = batch
    pre, post = make_model(seed=0, norm="pre"), make_model(seed=0, norm="post")
    assert isinstance(post.encoder_norm, torch.nn.Identity) and isinstance(post.decoder_norm, torch.nn.Identity)
    assert isinstance(pre.encoder_norm, torch.nn.LayerNorm)
    # same seed: identical projections and embeddings, only the wiring differs
    torch.testing.assert_close(pre.encoder_layers[0].self_attn.in_proj.weight,
                               post.encoder_layers[0].self_attn.in_proj.weight)
    out_pre, out_post = pre(src, tgt_in), post(src, tgt_in)
    assert torch.isfinite(out_post).all()
    assert (out_pre - out_post).abs().max() > 1e-3

    # post-norm by hand: x = LN(x + SelfAttn(x)); x = LN(x + FFN(x)) (no final LayerNorm)
    key_mask = (src != PAD_ID)[:, None, None, :]
    x = post._embed(post.src_embed, src)
    for layer in post.encoder_layers:
        x = layer.attn_block.norm(x + layer.self_attn.self_attention(x, key_mask=key_mask))
        x = layer.ffn_block.norm(x + layer.ffn(x))
    torch.testing.assert_close(post.encode(src).memory, x, atol=ATOL, rtol=0)


def reference_attention(mha: MultiHeadAttention, x: torch.Tensor, memory: torch.Tensor,
                        key_mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(d_head)) V by hand: Q from x, K and V from memory, [W_q; W_k; W_v] packed."""
    D, H = mha.d_model, mha.n_heads
    hd = D // H
    w_q, w_k, w_v = mha.in_proj.weight.split(D, dim=0)
    b_q, b_k, b_v = mha.in_proj.bias.split(D)
    B, T, _ = x.shape
    S = memory.shape[1]
    q = (x @ w_q.T + b_q).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
    k = (memory @ w_k.T + b_k).view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
    v = (memory @ w_v.T + b_v).view(B, S, H, hd).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, T, S)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, T, D)
    return out @ mha.out_proj.weight.T + mha.out_proj.bias


@torch.no_grad()
def test_cross_attention_matches_hand_written_attention():
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_model=16, n_heads=4)
    torch.nn.init.normal_(mha.in_proj.bias)  # non-zero biases, so their layout is checked too
    torch.nn.init.normal_(mha.out_proj.bias)
    mha.eval()
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    key_mask = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]

    out = mha.cross_attention(x, memory=memory, key_mask=key_mask)
    torch.testing.assert_close(out, reference_attention(mha, x, memory, key_mask), atol=ATOL, rtol=0)
    torch.testing.assert_close(mha.cross_attention(x, kv=mha.cross_kv(memory), key_mask=key_mask), out)
    # the mask matters: masked keys change nothing, unmasked attention differs
    changed = memory.clone()
    changed[1, 3:] = torch.randn(2, 16)
    torch.testing.assert_close(mha.cross_attention(x, memory=changed, key_mask=key_mask), out, atol=ATOL, rtol=0)
    unmasked = mha.cross_attention(x, memory=memory)
    torch.testing.assert_close(unmasked, reference_attention(mha, x, memory, None), atol=ATOL, rtol=0)
    assert (unmasked[1] - out[1]).abs().max() > 1e-3
    torch.testing.assert_close(unmasked[0], out[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_causal_self_attention_matches_hand_written_attention():
    torch.manual_seed(1)
    mha = MultiHeadAttention(d_model=16, n_heads=2)
    torch.nn.init.normal_(mha.in_proj.bias)
    mha.eval()
    x = torch.randn(2, 6, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    expected = reference_attention(mha, x, x, causal)
    torch.testing.assert_close(mha.self_attention(x, causal=True), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["self", "causal", "cross"])
def test_attention_gradients_match_hand_written_attention(kind):
    """The heads' split (``_SplitHeads``: its own backward) gives autograd's gradients for the
    inputs and every parameter."""
    torch.manual_seed(2)
    mha = MultiHeadAttention(d_model=16, n_heads=4)
    torch.nn.init.normal_(mha.in_proj.bias)
    x, memory = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True)
    key_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])[:, None, None, :]
    g = torch.randn(2, 3, 16)

    def grads(out: torch.Tensor) -> list[torch.Tensor]:
        inputs = [x] + ([memory] if kind == "cross" else []) + list(mha.parameters())
        return torch.autograd.grad(out, inputs, g)

    if kind == "cross":
        ours = grads(mha.cross_attention(x, memory=memory, key_mask=key_mask))
        expected = grads(reference_attention(mha, x, memory, key_mask))
    else:
        mask = torch.ones(3, 3, dtype=torch.bool).tril() if kind == "causal" else None
        ours = grads(mha.self_attention(x, causal=kind == "causal"))
        expected = grads(reference_attention(mha, x, x, mask))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def _graph_names(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that made t."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def test_fp32_cpu_training_attention_takes_the_batched_kernel_but_not_with_attention_dropout():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, requires_grad=True)
    assert "_SmallAttentionBackward" in _graph_names(MultiHeadAttention(16, 4).self_attention(x))
    assert "_SmallAttentionBackward" not in _graph_names(MultiHeadAttention(16, 4, dropout=0.1).self_attention(x))


@pytest.mark.parametrize("causal", [False, True])
def test_small_attention_equals_sdpa_and_its_gradients_pass_gradcheck(causal):
    """``_SmallAttention`` (fp32 on a CPU) against PyTorch's SDPA (an independent implementation) on
    strided views of a packed projection, a key mask with a padded row, and a row with no key at all:
    that row gets uniform weights and no gradient (masked scores are constants), not NaN."""
    from mt.model import _SmallAttention

    torch.manual_seed(4)
    B, H, T, hd = 3, 2, 5, 4
    x = torch.randn(B, T, 3 * H * hd, dtype=torch.float64, requires_grad=True)
    key_mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    key_mask[1, ..., 3:] = False
    key_mask[2] = False  # no key at all

    def heads(x):  # three (B, H, T, hd) views, as MultiHeadAttention makes them
        return x.view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4).unbind(0)

    assert torch.autograd.gradcheck(lambda x: _SmallAttention.apply(*heads(x), key_mask, causal), (x,))
    xf = x.detach().float().requires_grad_()
    g = torch.randn(B, H, T, hd)
    ours = _SmallAttention.apply(*heads(xf), key_mask, causal)
    (grad_ours,) = torch.autograd.grad(ours, xf, g)
    xs = xf.detach().requires_grad_()
    q, k, v = heads(xs)
    mask = key_mask & torch.ones(T, T, dtype=torch.bool).tril() if causal else key_mask
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[:2], k[:2], v[:2], attn_mask=mask[:2])
    (grad_sdpa,) = torch.autograd.grad(sdpa, xs, g[:2])
    torch.testing.assert_close(ours[:2], sdpa, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad_ours[:2], grad_sdpa[:2], atol=ATOL, rtol=0)
    # the row without keys: uniform weights over every key (future ones too when causal), no q or k gradient
    v2 = heads(xf)[2][2]  # (H, T, hd)
    torch.testing.assert_close(ours[2], v2.mean(1, keepdim=True).expand(H, T, hd), atol=ATOL, rtol=0)
    assert grad_ours[2].view(T, 3, H * hd)[:, :2].abs().max() == 0


@pytest.mark.parametrize("width", [1, 2, 7, 15, 16, 23])
def test_softmax_padded_for_narrow_rows_equals_torch_softmax_and_its_gradient(width):
    """``mt.model.softmax`` pads rows narrower than 16 with -inf (PyTorch's CPU kernel is slow on
    them): the same weights and gradients as ``Tensor.softmax``, also on rows whose keys are hidden
    (the lowest float) and on a row with every key hidden (uniform weights)."""
    from mt.model import _softmax_backward, softmax

    torch.manual_seed(5)
    x = torch.randn(3, 4, width) * 4
    x[1, 2, : width // 2] = torch.finfo(torch.float32).min
    x[2, 0] = torch.finfo(torch.float32).min
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = softmax(xa), xb.softmax(-1)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours[2, 0], torch.full((width,), 1 / width))
    g = torch.randn(3, 4, width)
    (grad_ours,), (grad_ref,) = torch.autograd.grad(ours, xa, g), torch.autograd.grad(ref, xb, g)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(_softmax_backward(g, ref.detach()), grad_ref, atol=1e-6, rtol=0)


def test_separate_vocabularies_of_equal_size_do_not_share_the_source_embedding():
    from mt.config import ModelConfig
    from mt.model import Transformer

    cfg = ModelConfig(d_model=16, n_heads=2, ffn_dim=32, encoder_layers=1, decoder_layers=1)
    joint, separate = Transformer(cfg, 50, 50, joint=True), Transformer(cfg, 50, 50, joint=False)
    assert joint.src_embed is joint.tgt_embed
    assert separate.src_embed is not separate.tgt_embed
