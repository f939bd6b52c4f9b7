"""Starting a run from a trained model (``train.init_from``): fine-tuning, as fairseq's
``--finetune-from-model`` and JoeyNMT's ``load_model`` with its ``reset_*`` flags do.

The parent is a run directory (its checkpoint chosen on validation, else ``best.pt``) or a checkpoint
file. The new run takes the parent's weights and tokenizer; its optimizer, schedule, step and data
position start afresh (``train.init_keep_optimizer`` keeps the parent's optimizer state on purpose).
The model's shape must be the parent's; dropout and everything about training may change.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from mt import checkpoint as ckpt
from mt.config import Config, ConfigError, ModelConfig
from mt.device import with_settings_of
from mt.run import Run, check_weights, checkpoint_config
from mt.tokenizer import Tokenizer

# what dropout and friends may change without touching a weight's shape or meaning
FREE = {"dropout", "attention_dropout", "activation_dropout"}


@dataclass
class Parent:
    path: Path  # the checkpoint file
    state: dict
    config: Config  # what the parent was trained with
    tokenizers: tuple[Path, Path]  # its SentencePiece model(s): source, target


def find_parent(spec: str) -> Parent:
    """``train.init_from``: a run directory or a checkpoint file written by mt train."""
    given = Path(spec)
    if given.is_dir():
        run = Run(given)
        path = run.resolve(run.read_defaults().get("checkpoint", "best"))
    elif given.is_file():
        path = given
        run = Run(given.parent.parent) if given.parent.name == Run.CHECKPOINTS else Run(given.parent)
    else:
        raise ConfigError(f"train.init_from: {spec}: no such run directory or checkpoint")
    state = ckpt.load(path)
    cfg = checkpoint_config(path, state)
    check_weights(path, state, cfg)
    tokenizers = run.tokenizer_paths(cfg.tokenizer.joint)
    trained_with = state.get("tokenizer") or {}
    for side, file in zip(("src", "tgt"), tokenizers):
        if not file.is_file():
            raise ConfigError(f"train.init_from: {file}: missing; the parent's weights need its tokenizer")
        tok = Tokenizer(file)
        if tok.vocab_size != state["vocab"][side] or trained_with.get(side, tok.fingerprint) != tok.fingerprint:
            raise ConfigError(f"train.init_from: {file} is not the tokenizer {path} was trained with")
    return Parent(path, state, cfg, tokenizers)


def adopt(cfg: Config, parent: Parent) -> Config:
    """``cfg`` with the parent's tokenizer, once its model shape is the parent's; a config that asks
    for another tokenizer or shape is refused, naming the keys."""
    mine, theirs = cfg.model, parent.config.model
    differ = [f.name for f in fields(ModelConfig) if f.name not in FREE and getattr(mine, f.name) != getattr(theirs, f.name)]
    if differ:
        raise ConfigError(f"train.init_from: the model differs from {parent.path}'s: " + ", ".join(
            f"model.{k}={getattr(mine, k)!r} (parent: {getattr(theirs, k)!r})" for k in differ))
    tok, parent_tok = cfg.tokenizer, parent.config.tokenizer
    if tok.joint != parent_tok.joint:
        raise ConfigError(f"train.init_from: tokenizer.joint={tok.joint} but {parent.path} has joint={parent_tok.joint}")
    src, tgt = parent.tokenizers
    for key, given, file in (("src_model", tok.src_model, src), ("tgt_model", tok.tgt_model, tgt)):
        if given and Tokenizer(given).fingerprint != Tokenizer(file).fingerprint:
            raise ConfigError(f"tokenizer.{key}: {given} is not {parent.path}'s tokenizer ({file}); a fine-tuned "
                              "model keeps its parent's (leave tokenizer.src_model/tgt_model unset)")
    if not tok.src_model:
        for key in ("vocab_size", "type"):
            if getattr(tok, key) != getattr(parent_tok, key):
                raise ConfigError(f"tokenizer.{key}={getattr(tok, key)!r}, but {parent.path}'s tokenizer has "
                                  f"{getattr(parent_tok, key)!r}; a fine-tuned model keeps its parent's tokenizer")
    return replace(cfg, tokenizer=replace(tok, src_model=str(src), tgt_model="" if tok.joint else str(tgt)))


def load_into(parent: Parent, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """The parent's weights into ``model``; with ``optimizer``, its state too (moments, step counts;
    the learning rate, betas, weight decay and the other settings stay this run's)."""
    model.load_state_dict(parent.state["model"])
    if optimizer is not None:
        saved = parent.state.get("optimizer")
        if not isinstance(saved, dict):
            raise ConfigError(f"train.init_keep_optimizer: {parent.path} holds no optimizer state "
                              "(an averaged or exported checkpoint); set it to false")
        # this run's settings merged in before loading, so that the step counters go where its kernel
        # (fused or not, mt.device.fused_adam) wants them
        optimizer.load_state_dict(with_settings_of(optimizer, saved, keys=None))
