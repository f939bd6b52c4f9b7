"""Looking inside a trained model: the attention weights of every layer for a sentence pair, and word
alignments from cross-attention.

``inspect`` runs the model teacher-forced on (source, target) while its attention modules record
their weights softmax(QKᵀ/√d) (``mt.model.attention_weights``, the product SDPA computes, spelled
out): encoder self-attention (bidirectional, source × source), decoder self-attention (causal, over
the decoder's input ``<s> y1 … y(n-1)``) and cross-attention (queries from the decoder, keys and
values from the encoder output). Row t of a cross-attention map belongs to the t-th output piece: the
decoder has read ``<s> y1 … y(t-1)`` there and predicts y_t.

``align`` gives word alignments as fairseq's ``--print-alignment`` does over pieces: each target piece
links to the source piece it attends to most, specials excluded on both sides; then pieces merge into
words (a ▁ starts one), and source word i and target word j are linked when any of their pieces are.
By default the cross-attention of all decoder layers and heads is averaged: on hand-annotated Multi30k
sentences that aligned better than any one layer (AER 32.8% against 36.1% for the best layer, in both
halves of the set; tests/data/gold_align_de_en.txt, scripts/eval_align.py, benchmarks/alignment.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from mt.batch import collate
from mt.errors import MtError
from mt.model import MultiHeadAttention, Transformer
from mt.tokenizer import EOS_ID, WORD_START, Tokenizer

KINDS = ("cross", "self-enc", "self-dec")
SPECIALS = frozenset({"<s>", "</s>", "<pad>"})
UNKNOWN = "<unk>"


class AttentionError(MtError):
    """A sentence or option that ``mt attention`` cannot show."""


def modules(model: Transformer, kind: str) -> list[MultiHeadAttention]:
    """The attention modules of one kind, first layer first."""
    if kind == "self-enc":
        return [layer.self_attn for layer in model.encoder_layers]
    if kind == "self-dec":
        return [layer.self_attn for layer in model.decoder_layers]
    if kind == "cross":
        return [layer.cross_attn for layer in model.decoder_layers]
    raise AttentionError(f"--kind {kind!r}: choose {', '.join(KINDS)}")


@contextmanager
def recording(mods: Sequence[MultiHeadAttention]) -> Iterator[list[list[torch.Tensor]]]:
    """While the block runs, each module keeps the weights of every call (one list per module)."""
    for m in mods:
        m.recorder = []
    try:
        yield [m.recorder for m in mods]
    finally:
        for m in mods:
            m.recorder = None


@torch.no_grad()
def forced(model: Transformer, src_ids: Sequence[Sequence[int]], out_ids: Sequence[Sequence[int]],
           mods: Sequence[MultiHeadAttention]) -> list[torch.Tensor]:
    """One teacher-forced pass (eval mode) over sentences ``src_ids`` with outputs ``out_ids`` (``</s>``
    last); the weights (B, H, T, S) each of ``mods`` computed, fp32 on the CPU, padding included (its
    columns 0)."""
    device = next(model.parameters()).device
    batch = collate(src_ids, out_ids, np.arange(len(src_ids)))
    was_training = model.training
    model.eval()
    try:
        with recording(mods) as recorded:
            model.decode_hidden(batch.tgt_in.to(device), model.encode(batch.src.to(device)))
    finally:
        model.train(was_training)
    return [calls[0].float().cpu() for calls in recorded]


@dataclass
class Maps:
    """The attention of one kind for one sentence pair: per layer, (heads, rows, columns) weights
    whose rows sum to 1; ``rows`` and ``columns`` are the pieces of queries and keys."""

    kind: str
    rows: list[str]
    columns: list[str]
    layers: list[torch.Tensor]

    def as_dict(self, digits: int = 5) -> dict:
        return {"kind": self.kind, "rows": self.rows, "columns": self.columns,
                "layers": [np.round(w.numpy(), digits).tolist() for w in self.layers]}


@dataclass
class Inspection:
    source: str
    target: str  # the text forced through the decoder (--tgt, or the model's translation)
    maps: dict[str, Maps]


def inspect(model: Transformer, src_tok: Tokenizer, tgt_tok: Tokenizer, source: str, target: str | None,
            translate=None, kinds: Sequence[str] = KINDS) -> Inspection:
    """The attention maps of every layer and head for one sentence pair, teacher-forced on ``target``,
    or on ``translate(source)`` -> (output ids, text) when ``target`` is None."""
    source = source.strip()
    if not source:
        raise AttentionError("--src is empty")
    limit = model.cfg.max_positions

    def fits(name: str, ids: list[int]) -> list[int]:
        if len(ids) > limit:
            raise AttentionError(f"{name}: {len(ids)} pieces; the model holds {limit}")
        return ids

    src_ids = fits("--src", src_tok.encode([source])[0])
    if target is None:
        out_ids, target = translate(source)
        out_ids = list(out_ids) + [EOS_ID]
    else:
        out_ids = fits("--tgt", tgt_tok.encode([target.strip()])[0])
    mods = {kind: modules(model, kind) for kind in kinds}
    weights = forced(model, [src_ids], [out_ids], [m for kind in kinds for m in mods[kind]])
    src_pieces, out_pieces = src_tok.pieces(src_ids), tgt_tok.pieces(out_ids)
    in_pieces = ["<s>"] + out_pieces[:-1]  # the decoder's input: teacher forcing
    axes = {"cross": (out_pieces, src_pieces), "self-enc": (src_pieces, src_pieces),
            "self-dec": (in_pieces, in_pieces)}
    maps, start = {}, 0
    for kind in kinds:
        layers = [w[0] for w in weights[start: start + len(mods[kind])]]  # (H, rows, columns) each
        start += len(mods[kind])
        maps[kind] = Maps(kind, *axes[kind], layers)
    return Inspection(source, target, maps)


def word_index(pieces: Sequence[str], unknown_is_word: bool = False) -> list[int]:
    """The word (0, 1, ...) of each piece, -1 for specials: a piece starting with ▁ starts a word, the
    pieces after it continue it; a piece that is only ▁ belongs to the word after it. With
    ``unknown_is_word`` (an output: decoding prints ``<unk>`` as " ⁇ "), ``<unk>`` is a word of its
    own and the piece after it starts another."""
    out, word, opening = [], -1, True
    for piece in pieces:
        if piece in SPECIALS:
            out.append(-1)
            continue
        unknown = unknown_is_word and piece == UNKNOWN
        if piece.startswith(WORD_START) or unknown:
            opening = True
        if opening and piece.strip(WORD_START):
            word, opening = word + 1, False
        out.append(word + 1 if opening else word)
        opening = opening or unknown
    return [w if w <= word else -1 for w in out]  # a trailing ▁ opens no word


def links(weights: torch.Tensor, src_words: Sequence[int], tgt_words: Sequence[int]) -> list[tuple[int, int]]:
    """(source word, target word) links from one sentence's cross-attention ``weights`` (T, S), heads
    merged, one row per output piece: each target piece links to the source piece it attends to most
    among the non-special ones; words take the links of their pieces. Sorted by target word."""
    real = torch.tensor([w >= 0 for w in src_words], dtype=torch.bool)
    if not real.any():
        return []
    best = weights.float().masked_fill(~real, -1.0).argmax(-1).tolist()  # (T,)
    pairs = {(src_words[s], tgt_words[t]) for t, s in enumerate(best) if tgt_words[t] >= 0}
    return sorted(pairs, key=lambda p: (p[1], p[0]))


def align(model: Transformer, src_tok: Tokenizer, tgt_tok: Tokenizer, src_ids: Sequence[Sequence[int]],
          out_ids: Sequence[Sequence[int]], layer: int | None = None) -> list[list[tuple[int, int]]]:
    """Word links of each pair of ``src_ids`` and output ids (``</s>`` last), in one batched pass, from
    the cross-attention of all decoder layers and heads averaged, or of decoder layer ``layer`` alone
    (0-based; negative: from the last) with its heads averaged."""
    if not src_ids:
        return []
    mods = modules(model, "cross")
    weights = forced(model, src_ids, out_ids, mods if layer is None else [mods[layer]])  # (B, H, T, S) each
    mean = torch.stack(weights).mean((0, 2))  # (B, T, S)
    return [links(mean[b, : len(t), : len(s)], word_index(src_tok.pieces(s)),
                  word_index(tgt_tok.pieces(t), unknown_is_word=True))
            for b, (s, t) in enumerate(zip(src_ids, out_ids))]


def format_links(pairs: Sequence[tuple[int, int]]) -> str:
    """fairseq's ``srcidx-tgtidx`` pairs, space-separated."""
    return " ".join(f"{s}-{t}" for s, t in pairs)
