"""Padded batches and teacher forcing: the tensors the model reads, built from lists of ids.

Kept apart from ``mt.data`` (corpora, the tokenized cache, cleaning and batching) so that
translating imports nothing of training's data handling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mt.tokenizer import BOS_ID, PAD_ID


@dataclass
class Batch:
    """A padded batch. ``tgt_in`` is ``<s> y1 .. yn`` and ``tgt_out`` is ``y1 .. yn </s>``."""

    src: torch.Tensor  # (B, S)
    tgt_in: torch.Tensor  # (B, T)
    tgt_out: torch.Tensor  # (B, T)
    indices: np.ndarray  # (B,) example indices in the dataset

    @property
    def num_tgt_tokens(self) -> int:
        return int((self.tgt_out != PAD_ID).sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.src.to(device, non_blocking=True), self.tgt_in.to(device, non_blocking=True),
                     self.tgt_out.to(device, non_blocking=True), self.indices)


def pad(sequences: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> torch.Tensor:
    """Right-pad sequences of ids (lists or arrays) to a (B, max_len) long tensor."""
    out = np.full((len(sequences), max(map(len, sequences))), pad_id, dtype=np.int64)
    for row, seq in zip(out, sequences):
        row[: len(seq)] = seq
    return torch.from_numpy(out)


def collate(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], indices: np.ndarray) -> Batch:
    """Teacher forcing: the decoder reads the target shifted right by one, starting with ``<s>``."""
    tgt_out = pad(tgt_ids)  # (B, T)
    lengths = torch.tensor([len(t) for t in tgt_ids])  # (B,)
    shifted = torch.cat([torch.full_like(tgt_out[:, :1], BOS_ID), tgt_out[:, :-1]], dim=1)  # (B, T)
    inside = torch.arange(tgt_out.shape[1]) < lengths[:, None]  # (B, T)
    tgt_in = torch.where(inside, shifted, PAD_ID)
    return Batch(src=pad(src_ids), tgt_in=tgt_in, tgt_out=tgt_out, indices=indices)
