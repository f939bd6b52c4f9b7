"""Attention weights and word alignments (mt.attention): the recorded weights are the ones SDPA applies,
padding gets none, the decoder's are causal, and cross-attention aligns a reversal task."""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from mt import attention
from mt.batch import collate, pad
from mt.config import ModelConfig
from mt.model import MultiHeadAttention, Transformer
from mt.tokenizer import EOS_ID, PAD_ID

V = 24  # specials 0..3, symbols 4..23


def tiny(layers: int = 2, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=64, n_heads=4, ffn_dim=128, encoder_layers=layers, decoder_layers=layers,
                      dropout=0.0, max_positions=64)
    return Transformer(cfg, V, V)


def call_order(model: Transformer) -> list[MultiHeadAttention]:
    """The attention modules in the order a forward pass calls them."""
    mods = [layer.self_attn for layer in model.encoder_layers]
    for layer in model.decoder_layers:
        mods += [layer.self_attn, layer.cross_attn]
    return mods


@torch.no_grad()
def test_recorded_weights_times_values_reproduce_each_layers_attention(monkeypatch):
    model = tiny().eval()
    gen = torch.Generator().manual_seed(3)
    srcs = [torch.randint(4, V, (n,), generator=gen).tolist() + [EOS_ID] for n in (7, 3)]  # the second is padded
    outs = [torch.randint(4, V, (n,), generator=gen).tolist() + [EOS_ID] for n in (5, 8)]
    batch = collate(srcs, outs, None)

    # the plain forward: SDPA's outputs before the output projection, and the values they were made from
    values, products = [], []
    attend, merge = MultiHeadAttention._attend, MultiHeadAttention._merge
    monkeypatch.setattr(MultiHeadAttention, "_attend",
                        lambda self, q, k, v, mask, causal: values.append(v) or attend(self, q, k, v, mask, causal))
    monkeypatch.setattr(MultiHeadAttention, "_merge", lambda self, out: products.append(out) or merge(self, out))
    plain = model.decode_hidden(batch.tgt_in, model.encode(batch.src))
    monkeypatch.undo()

    mods = call_order(model)
    with attention.recording(mods) as recorded:
        spelled_out = model.decode_hidden(batch.tgt_in, model.encode(batch.src))
    torch.testing.assert_close(spelled_out, plain, atol=1e-5, rtol=0)
    weights = attention.forced(model, srcs, outs, mods)
    assert len(weights) == len(values) == len(products) == len(mods) == 2 + 2 * 2
    for w, again in zip(weights, recorded):
        torch.testing.assert_close(w, again[0], atol=0, rtol=0)
    for n, (w, v, out) in enumerate(zip(weights, values, products)):
        torch.testing.assert_close(torch.matmul(w, v), out, atol=1e-5, rtol=0, msg=f"module {n}")
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5, rtol=0)

    src_pad = batch.src == PAD_ID  # (B, S)
    assert src_pad[1].any()
    for w in weights[:2] + weights[3::2]:  # encoder self-attention and cross-attention: keys are the source
        padded = src_pad[:, None, None, :].expand_as(w)
        assert (w[padded] == 0).all() and (w[~padded] > 0).all()
    for w in weights[2::2]:  # decoder self-attention: nothing after the query's own position
        T = w.shape[-1]
        assert (w[..., ~torch.ones(T, T, dtype=torch.bool).tril()] == 0).all()
        assert (w[..., torch.ones(T, T, dtype=torch.bool).tril()][0] > 0).all()


def test_word_index_merges_pieces_and_skips_specials():
    pieces = ["▁Ein", "▁Mann", "s", "▁", ",", "▁lä", "uft", ".", "</s>"]
    assert attention.word_index(pieces) == [0, 1, 1, 2, 2, 3, 3, 3, -1]
    assert attention.word_index(["a", "b", "▁c", "▁", "</s>"]) == [0, 0, 1, -1, -1]  # a trailing ▁ opens no word
    assert attention.word_index(["<s>", "▁x", "</s>"]) == [-1, 0, -1]
    # an output's <unk> is printed " ⁇ ": a word of its own, and what follows it another
    assert attention.word_index(["▁a", "<unk>", "s", "▁b", "</s>"], unknown_is_word=True) == [0, 1, 2, 3, -1]
    assert attention.word_index(["▁a", "<unk>", "s", "▁b", "</s>"]) == [0, 0, 0, 1, -1]  # a source's: inside its word


def test_links_take_the_most_attended_real_piece_and_merge_words():
    weights = torch.tensor([[0.1, 0.2, 0.7],   # row 0 attends most to </s>: its best real piece is 1
                            [0.6, 0.3, 0.1],
                            [0.0, 0.0, 1.0]])  # the output's </s>: never linked
    assert attention.links(weights, [0, 0, -1], [0, 1, -1]) == [(0, 0), (0, 1)]
    assert attention.links(weights, [0, 1, -1], [0, 0, -1]) == [(0, 0), (1, 0)]
    assert attention.format_links([(0, 0), (2, 1)]) == "0-0 2-1"


class Symbols:
    """Each symbol id is one word (a piece of its own)."""

    def pieces(self, ids):
        return ["</s>" if i == EOS_ID else f"▁s{i}" for i in ids]


def test_alignments_recover_the_reversed_positions_of_a_reversal_model():
    model = tiny(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)

    def sample(n: int) -> tuple[list[list[int]], list[list[int]]]:
        lengths = torch.randint(3, 9, (n,), generator=gen).tolist()
        srcs = [torch.randint(4, V, (k,), generator=gen).tolist() for k in lengths]
        return [s + [EOS_ID] for s in srcs], [s[::-1] + [EOS_ID] for s in srcs]

    for step in range(400):
        srcs, outs = sample(32)
        batch = collate(srcs, outs, None)
        logits = model(batch.src, batch.tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    srcs, outs = sample(100)
    with torch.no_grad():
        exact = (model(pad(srcs), collate(srcs, outs, None).tgt_in).argmax(-1) == pad(outs))[pad(outs) != PAD_ID]
    assert exact.float().mean() > 0.9, "the model must have learnt to reverse for the test to mean anything"
    found = attention.align(model, Symbols(), Symbols(), srcs, outs)
    right = total = 0
    for src, links in zip(srcs, found):
        n = len(src) - 1  # words, </s> excluded
        by_target = {}
        for s, t in links:
            by_target.setdefault(t, set()).add(s)
        right += sum(by_target.get(j) == {n - 1 - j} for j in range(n))
        total += n
    assert right / total >= 0.9, f"{right}/{total} target words aligned to their reversed position"


def test_gold_alignments_are_well_formed(repo_root, multi30k_head):
    spec = importlib.util.spec_from_file_location("eval_align", repo_root / "scripts" / "eval_align.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gold = module.read_gold()
    assert sorted(gold) == list(range(1, 51))
    de, en = multi30k_head("test_2016_flickr", "de", 50), multi30k_head("test_2016_flickr", "en", 50)
    for n, (sure, possible) in gold.items():
        src_words, tgt_words = len(de[n - 1].split()), len(en[n - 1].split())
        assert sure and sure <= possible, f"line {n}"
        assert all(i < src_words and j < tgt_words for i, j in possible), f"line {n}: a link out of range"
        assert len({j for _, j in possible}) >= tgt_words // 2, f"line {n}: most English words are aligned"
