"""Greedy and beam search over the model's incremental decoding API (fairseq's SequenceGenerator idea:
search lives outside the model and drives ``init_cache`` / ``decode(cache=...)`` / ``reorder_beams``).

Both searches are batched over sentences and beams: one decoder call per step for the whole batch,
rows of size B·K (B at beam search's first step, where all K beams of a sentence would be the same;
the rows then branch into beams). Cross-attention keys/values are computed once per source.
Candidates come from a two-stage top-k (vocabulary blocks, then tokens), never a
top-k over whole rows of the vocabulary. Sentences whose search is over leave the running batch, so
each sentence's result does not depend on the others.

Scores. A hypothesis y of |y| tokens (``</s>`` included) has model score log p(y|x) = Σ_t log p(y_t|..)
and is ranked by the length-normalised score  log p(y|x) / |y|^α  (α = ``lenpen``; α = 0 ranks by
model score, α = 1 by per-token score; fairseq's convention). Output length is at most
``max_len_a · |x| + max_len_b`` tokens (|x| counts the source's ``</s>``) and at least ``min_len``
tokens before ``</s>``. Only ``</s>`` among the ``beam`` best candidates of a step ends a hypothesis,
and a sentence stops once ``beam`` of its hypotheses have ended (fairseq's rule; the finished ones are
then the best-scoring ways to end found so far, and beam size 1 is exactly greedy search).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mt.model import EncoderOut, Transformer, sentence_rows
from mt.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclass
class Hypothesis:
    tokens: list[int]  # output ids, without </s>
    score: float  # length-normalised: model_score / len**lenpen
    model_score: float  # log p(tokens + </s> | source)


def _max_lengths(src: torch.Tensor, max_len_a: float, max_len_b: int, limit: int) -> torch.Tensor:
    """(B,) maximum output lengths (``</s>`` included), at least 1, at most the model's positions."""
    src_len = (src != PAD_ID).sum(dim=1)
    return (max_len_a * src_len + max_len_b).long().clamp(min=1, max=limit)


def _normalise(score: float, length: int, lenpen: float) -> float:
    return score / length ** lenpen if lenpen else score


class _DecoderState:
    """The decoder's view of the running rows (``beam`` per sentence, sentence-major): the KV cache,
    or (``use_cache=False``, for comparison and tests) the encoder output, re-running the decoder on
    the whole prefix every step."""

    def __init__(self, model: Transformer, enc: EncoderOut, use_cache: bool, beam: int = 1):
        self.model, self.beam, self.sentences = model, beam, enc.memory.shape[0]
        self.cache = model.init_cache(enc, beam=beam) if use_cache else None
        if self.cache is None:
            rows = torch.arange(enc.memory.shape[0], device=enc.memory.device).repeat_interleave(beam)
            enc = EncoderOut(enc.memory.index_select(0, rows), enc.src_mask.index_select(0, rows))
        self.enc = enc

    def logits(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (R, t) of ids -> logits (R, V) of the next token."""
        if self.cache is not None:
            return self.model.decode(prefix[:, -1:], cache=self.cache)[:, -1]
        return self.model.decode(prefix, self.enc)[:, -1]

    def reorder_beams(self, rows: torch.Tensor) -> None:
        """Row i continues row ``rows[i]`` of the same sentence; ``rows`` may hold more rows per
        sentence than before (branching into beams)."""
        self.beam = rows.numel() // self.sentences
        if self.cache is not None:
            self.cache.reorder_beams(rows)
        else:
            self._select(rows)

    def select_sentences(self, index: torch.Tensor) -> None:
        self.sentences = index.numel()
        if self.cache is not None:
            self.cache.select_sentences(index)
        else:
            self._select(sentence_rows(index, self.beam))

    def _select(self, rows: torch.Tensor) -> None:
        self.enc = EncoderOut(self.enc.memory.index_select(0, rows), self.enc.src_mask.index_select(0, rows))


def _next_log_probs(state: _DecoderState, prefix: torch.Tensor, step: int, min_len: int,
                    must_end: torch.Tensor) -> torch.Tensor:
    """(R, V) log-probabilities of the next token after ``prefix`` (R, step + 1), -inf where not
    allowed: ``<pad>``, ``<s>``, ``</s>`` before ``min_len`` tokens, anything but ``</s>`` in rows
    ``must_end`` (R,). ``step`` tokens have been generated."""
    logits = state.logits(prefix).float()  # (R, V), a new tensor: its log-softmax overwrites it
    lprobs = torch.log_softmax(logits, dim=-1, out=logits)  # in place: half the memory a step streams through
    lprobs[:, PAD_ID] = -math.inf
    lprobs[:, BOS_ID] = -math.inf
    if step < min_len:
        lprobs[:, EOS_ID] = -math.inf
    if must_end.any():
        eos = lprobs[must_end, EOS_ID].clone()
        lprobs[must_end] = -math.inf
        lprobs[must_end, EOS_ID] = eos.clamp(min=torch.finfo(lprobs.dtype).min)
    return lprobs


BLOCK = 64  # vocabulary block of the two-stage top-k


def _top_candidates(lprobs: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The k best continuations of each sentence's hypotheses: lprobs (B·W, V) for W rows per
    sentence, scores (B, W) of those rows -> scores, row within the sentence and token, (B, k)
    each, best first. Two stages, so that no top-k runs over whole rows of V: the k best
    candidates lie in the k vocabulary blocks (of one row each) with the best maxima."""
    B, W = scores.shape
    V = lprobs.shape[1]
    if V % BLOCK or V < 4 * BLOCK:  # one stage
        candidates = (scores.view(-1, 1) + lprobs).view(B, W * V)
        top, index = candidates.topk(min(k, W * V), dim=1)
        return top, index // V, index % V
    nb = V // BLOCK
    best_in_block = lprobs.view(B * W, nb, BLOCK).amax(dim=2).add_(scores.view(-1, 1))  # (B·W, nb)
    blocks = best_in_block.view(B, W * nb).topk(min(k, W * nb), dim=1).indices  # (B, k') of row·nb + block
    row = blocks // nb
    tokens = ((blocks % nb) * BLOCK)[:, :, None] + torch.arange(BLOCK, device=lprobs.device)  # (B, k', BLOCK)
    candidates = lprobs[(torch.arange(B, device=lprobs.device)[:, None] * W + row)[:, :, None], tokens]
    candidates = candidates.add_(scores.gather(1, row)[:, :, None]).view(B, -1)  # (B, k'·BLOCK)
    top, index = candidates.topk(min(k, candidates.shape[1]), dim=1)
    return top, row.gather(1, index // BLOCK), tokens.view(B, -1).gather(1, index)


@torch.inference_mode()
def greedy_search(model: Transformer, src: torch.Tensor, *, max_len_a: float = 1.2, max_len_b: int = 10,
                  min_len: int = 1, lenpen: float = 1.0, use_cache: bool = True) -> list[Hypothesis]:
    """Pick the most probable token at every step. src (B, S) -> one hypothesis per sentence."""
    B = src.shape[0]
    max_len = _max_lengths(src, max_len_a, max_len_b, model.cfg.max_positions)
    state = _DecoderState(model, model.encode(src), use_cache)
    alive = torch.arange(B, device=src.device)  # original index of each running row
    prefix = torch.full((B, 1), BOS_ID, dtype=torch.long, device=src.device)  # (R, step + 1)
    scores = torch.zeros(B, device=src.device)
    out = torch.full((B, int(max_len.max())), EOS_ID, dtype=torch.long, device=src.device)
    final = torch.zeros(B, device=src.device)
    step = 0
    while alive.numel():
        lprobs = _next_log_probs(state, prefix, step, min_len, must_end=max_len[alive] == step + 1)
        best, last = lprobs.max(dim=1)  # (R,)
        prefix = torch.cat([prefix, last[:, None]], dim=1)
        scores = scores + best
        out[alive, step] = last
        step += 1
        done = last == EOS_ID
        if done.any():
            final[alive[done]] = scores[done]
            keep = (~done).nonzero().squeeze(1)
            alive, prefix, scores = alive[keep], prefix[keep], scores[keep]
            state.select_sentences(keep)
    results = []
    for row, score in zip(out.tolist(), final.tolist()):
        n = row.index(EOS_ID)
        results.append(Hypothesis(row[:n], _normalise(score, n + 1, lenpen), score))
    return results


@torch.inference_mode()
def beam_search(model: Transformer, src: torch.Tensor, *, beam: int = 5, lenpen: float = 1.0,
                max_len_a: float = 1.2, max_len_b: int = 10, min_len: int = 1,
                nbest: int = 1, use_cache: bool = True) -> list[list[Hypothesis]]:
    """Beam search for each sentence of src (B, S); returns the ``nbest`` best hypotheses of each,
    best first."""
    if nbest > beam:
        raise ValueError(f"nbest ({nbest}) cannot exceed beam ({beam})")
    B, K, device = src.shape[0], beam, src.device
    max_len = _max_lengths(src, max_len_a, max_len_b, model.cfg.max_positions)
    # the first step runs one row per sentence (all its beams would be the same), then branches into K
    width = 1 if model.tgt_vocab >= K else K  # rows per running sentence
    state = _DecoderState(model, model.encode(src), use_cache, beam=width)
    alive = torch.arange(B, device=device)  # (B') original sentence index of each running sentence
    scores = torch.full((B, width), -math.inf, device=device)
    scores[:, 0] = 0.0  # only one live hypothesis at the start
    prefix = torch.full((B * width, 1), BOS_ID, dtype=torch.long, device=device)  # (B'·width, step + 1)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    n_finished = torch.zeros(B, dtype=torch.long, device=device)  # (B,) len(finished[sentence])
    step = 0
    while alive.numel():
        Ba = alive.numel()
        must_end = (max_len[alive] == step + 1).repeat_interleave(width)
        lprobs = _next_log_probs(state, prefix, step, min_len, must_end)  # (B'·width, V)
        top_scores, top_beam, top_token = _top_candidates(lprobs, scores, 2 * K)  # (B', 2K) each, best first
        is_eos = top_token == EOS_ID
        step += 1

        # </s> among the K best candidates finishes a hypothesis
        ends = (is_eos[:, :K] & (top_scores[:, :K] > -math.inf)).nonzero()  # (E, 2) of (sentence, candidate)
        if ends.numel():
            b, j = ends.unbind(1)
            sids = alive[b].tolist()
            prefixes = prefix[b * width + top_beam[b, j], 1:].tolist()
            for sid, tokens, model_score in zip(sids, prefixes, top_scores[b, j].tolist()):
                finished[sid].append(Hypothesis(tokens, _normalise(model_score, step, lenpen), model_score))
            for sid in set(sids):
                finished[sid] = sorted(finished[sid], key=lambda h: -h.score)[:K]
                n_finished[sid] = len(finished[sid])

        # the K best candidates that do not end continue
        rank = torch.arange(top_scores.shape[1], device=device) + is_eos * top_scores.shape[1]
        pick = rank.topk(K, dim=1, largest=False).indices  # (B', K), in score order
        scores = top_scores.gather(1, pick)
        rows = (torch.arange(Ba, device=device) * width)[:, None] + top_beam.gather(1, pick)  # (B', K)
        rows = rows.view(-1)
        prefix = torch.cat([prefix[rows], top_token.gather(1, pick).view(-1, 1)], dim=1)
        state.reorder_beams(rows)
        width = K

        # a sentence is over once K of its hypotheses have ended (fairseq's rule: beam 1 is greedy), at
        # its length limit, or with no open hypothesis left
        done = (n_finished[alive] >= K) | (max_len[alive] <= step) | torch.isneginf(scores).all(dim=1)
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            alive, scores, prefix = alive[keep], scores[keep], prefix[sentence_rows(keep, K)]
            state.select_sentences(keep)
    return [hyps[:nbest] for hyps in finished]
