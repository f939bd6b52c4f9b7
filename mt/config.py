"""Typed configuration: dataclasses with defaults, YAML loading, ``key=value`` overrides, validation.

A config file is YAML with the sections ``data``, ``tokenizer``, ``model``, ``train`` and ``decode``.
Every key has a default and a docstring here, so a file only names what it changes. Values are
validated where the dataclass is built (``__post_init__``), before any data is read: every number
finite, every ``Literal`` one of its choices, ranges checked; errors name the key and the valid values. The resolved
config (every key, defaults included) is written to ``RUN_DIR/config.yaml`` and is all that
``mt translate`` needs besides the tokenizer and the checkpoint.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mt.errors import MtError
from mt.files import atomic_write


class ConfigError(MtError):
    """A configuration value or key is invalid; the message names it."""


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check_fields(obj: Any, section: str) -> None:
    """Every float field (and float in a tuple or list) finite, every ``Literal`` field one of its
    choices: checked for each dataclass as it is built, from YAML or from Python."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value, hint = f"{section}.{f.name}", getattr(obj, f.name), hints[f.name]
        if typing.get_origin(hint) is Literal:
            _choice(key, value, typing.get_args(hint))
        for number in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"{key}: must be a finite number, got {number!r}")


def parse_duration(text: str, key: str = "duration") -> float:
    """``90``, ``45s``, ``30m``, ``1.5h`` -> seconds; empty -> 0 (no limit)."""
    text = str(text).strip()
    if not text:
        return 0.0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a duration like 45s, 30m or 2h") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{key}: must be a positive finite duration, got {text!r}")
    return seconds


@dataclass
class CorpusConfig:
    """Where one split of parallel text comes from. Set exactly one of: src+tgt, path, hub."""

    src: str = ""
    """Source side as plain text, one sentence per line (``.gz`` allowed)."""
    tgt: str = ""
    """Target side as plain text, line N translating line N of ``src``."""
    path: str = ""
    """A single file: ``.tsv`` (source<TAB>target) or ``.jsonl`` ({"src","tgt"} or HF {"translation"})."""
    hub: str = ""
    """A Hugging Face hub dataset name (needs network), read with ``datasets.load_dataset``."""
    hub_config: str = ""
    """The hub dataset's configuration name, e.g. ``de-en``."""
    split: str = "train"
    """The hub dataset's split."""
    weight: float = 1.0
    """Training corpora: how often each pair is used per epoch (4: upsampled x4; 0.5: a seeded half)."""

    def __post_init__(self) -> None:
        _check_fields(self, "corpus")
        if self.weight <= 0:
            raise ConfigError(f"corpus.weight: must be > 0, got {self.weight!r}")
        given = [name for name, on in (("src/tgt", self.src or self.tgt), ("path", self.path),
                                       ("hub", self.hub)) if on]
        if len(given) > 1:
            raise ConfigError(f"corpus: set only one of src+tgt, path, hub (got {', '.join(given)})")
        if bool(self.src) != bool(self.tgt):
            raise ConfigError("corpus: src and tgt must be given together")

    @property
    def is_set(self) -> bool:
        return bool(self.src or self.path or self.hub)

    def describe(self) -> str:
        if self.src:
            return f"{self.src} + {self.tgt}"
        if self.path:
            return self.path
        return f"hub:{self.hub}" + (f"/{self.hub_config}" if self.hub_config else "") + f"[{self.split}]"


@dataclass
class DataConfig:
    """Parallel corpora and the cleaning applied to the training pairs."""

    src_lang: str = "de"
    """Source language code (the key in HF ``{"translation": {..}}`` records)."""
    tgt_lang: str = "en"
    """Target language code."""
    train: list[CorpusConfig] = field(default_factory=list)
    """The training pairs: one corpus, or a list of corpora, each with its ``weight``."""
    valid: CorpusConfig = field(default_factory=CorpusConfig)
    """Validation pairs: loss and BLEU during training, early stopping, decoding defaults."""
    test: CorpusConfig = field(default_factory=CorpusConfig)
    """Optional held-out test split (used by recipes and ``mt eval``, never for training decisions)."""
    max_len: int = 128
    """Training pairs with more tokens than this on either side (``</s>`` included) are dropped."""
    max_ratio: float = 3.0
    """Training pairs whose token-length ratio exceeds this are dropped; 0 disables the filter."""
    num_proc: int = 0
    """Processes that tokenize a corpus into the cache; 0: one per core."""
    cache_dir: str = ""
    """Where tokenized corpora are cached (and hub datasets, under ``hub/``); empty: ``$XDG_CACHE_HOME/mt``
    (hub datasets: the Hugging Face default)."""
    dedup: bool = False
    """Drop training pairs identical (both sides) to an earlier pair of the same corpus; counted as duplicates."""
    sampling_alpha: float = 0.0
    """Subword regularisation (Kudo, 2018): every training batch's sentences, both sides, are
    segmented anew each time they are drawn: one of their ``sampling_nbest`` best segmentations,
    with probability proportional to P(segmentation)^α (smaller α: more varied; 1: as the model
    believes). 0: off, always the one best segmentation. Needs a unigram tokenizer. Batches are
    packed by the one best segmentation's lengths, so sampled ones run a little over
    ``train.max_tokens`` (about 4% more pieces at α 0.2 on Multi30k)."""
    sampling_nbest: int = 8
    """How many of a sentence's best segmentations sampling draws from (at least 2; 64 in Kudo's
    paper; each draw is an n-best search, about 0.05 ms a sentence at 8)."""

    def __post_init__(self) -> None:
        _check_fields(self, "data")
        _positive("data.max_len", self.max_len)
        if not 0.0 <= self.sampling_alpha <= 1.0:
            raise ConfigError(f"data.sampling_alpha: {self.sampling_alpha} is not between 0 and 1 (0: no sampling)")
        if self.sampling_nbest < 2:
            raise ConfigError(f"data.sampling_nbest: {self.sampling_nbest}: sampling needs at least 2 segmentations")
        _positive("data.max_ratio", self.max_ratio, allow_zero=True)
        _positive("data.num_proc", self.num_proc, allow_zero=True)
        if isinstance(self.train, CorpusConfig):  # DataConfig(train=CorpusConfig(...)) from Python
            self.train = [self.train]
        for name in ("valid", "test"):
            if getattr(self, name).weight != 1.0:
                raise ConfigError(f"data.{name}.weight: only training corpora have weights")
        if self.src_lang == self.tgt_lang:
            raise ConfigError(f"data.src_lang and data.tgt_lang are both {self.src_lang!r}")


@dataclass
class TokenizerConfig:
    """SentencePiece subword model(s). Trained on the training corpus when no model is named."""

    src_model: str = ""
    """An existing SentencePiece model for the source side (or both sides when joint)."""
    tgt_model: str = ""
    """An existing SentencePiece model for the target side (separate vocabularies only)."""
    type: Literal["unigram", "bpe"] = "unigram"
    """SentencePiece algorithm: unigram or bpe."""
    vocab_size: int = 8000
    """Vocabulary size, special tokens included."""
    joint: bool = True
    """One vocabulary for both languages; allows sharing all embeddings."""
    character_coverage: float = 1.0
    """Share of characters the model covers; the rest map to <unk> (0.9995 for CJK-sized alphabets)."""
    input_sentence_size: int = 2_000_000
    """The model is trained on a uniform sample of this many sentences (seeded by train.seed); 0 uses all."""

    def __post_init__(self) -> None:
        _check_fields(self, "tokenizer")
        if self.vocab_size < 8:
            raise ConfigError(f"tokenizer.vocab_size: must be >= 8, got {self.vocab_size}")
        if not 0 < self.character_coverage <= 1:
            raise ConfigError("tokenizer.character_coverage: must be in (0, 1]")
        if self.joint and self.tgt_model and self.tgt_model != self.src_model:
            raise ConfigError("tokenizer.tgt_model: a joint tokenizer uses src_model for both sides")


@dataclass
class ModelConfig:
    """Transformer shape. Defaults map one-to-one onto HF ``M2M100ForConditionalGeneration``."""

    d_model: int = 512
    """Width of every layer (embeddings, attention, residual stream)."""
    n_heads: int = 8
    """Attention heads per layer; must divide d_model."""
    ffn_dim: int = 2048
    """Inner width of each feed-forward block."""
    encoder_layers: int = 6
    """Encoder layers (bidirectional self-attention + feed-forward)."""
    decoder_layers: int = 6
    """Decoder layers (causal self-attention, cross-attention, feed-forward)."""
    dropout: float = 0.1
    """Dropout on embeddings and on each sub-layer's output."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    activation_dropout: float = 0.0
    """Dropout after the feed-forward activation."""
    activation: Literal["relu", "gelu"] = "relu"
    """Feed-forward activation: relu or gelu."""
    norm: Literal["pre", "post"] = "pre"
    """pre: LayerNorm before each sub-layer plus a final one (M2M100); post: after (the 2017 paper)."""
    scale_embedding: bool = True
    """Multiply token embeddings by sqrt(d_model)."""
    share_embeddings: bool = True
    """Tie the target embedding and the output projection (and the source embedding when joint)."""
    max_positions: int = 1024
    """Longest sequence the sinusoidal position table covers."""

    def __post_init__(self) -> None:
        _check_fields(self, "model")
        for key in ("d_model", "n_heads", "ffn_dim", "encoder_layers", "decoder_layers", "max_positions"):
            _positive(f"model.{key}", getattr(self, key))
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        for key in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"model.{key}: must be in [0, 1)")


@dataclass
class RegimeConfig:
    """One item of ``train.regimes``: settings for a budget that affords at least ``min_epochs``."""

    min_epochs: float = 0.0
    """Taken when the budget affords at least this many epochs at the base settings (of the regimes
    that qualify, the one with the largest min_epochs)."""
    set: list[str] = field(default_factory=list)
    """The settings, as on the command line: ``model.dropout=0.3``, ``train.max_tokens=4096`` (model and
    train keys, not those the choice is made from: the budget, precision, device and threads; of the
    data keys, those of subword regularisation, ``REGIME_DATA``, which apply batch by batch)."""

    def __post_init__(self) -> None:
        _check_fields(self, "regime")
        _positive("regime.min_epochs", self.min_epochs, allow_zero=True)
        for text in self.set:
            try:
                keys, _ = parse_override(text)
            except ConfigError:
                raise ConfigError(f"regime.set: {text!r} is not a KEY=VALUE setting") from None
            if len(keys) != 2 or not (keys[0] in ("model", "train") or keys[0] == "data" and keys[1] in REGIME_DATA):
                raise ConfigError(f"regime.set: {text!r} is not a model.KEY=VALUE or train.KEY=VALUE setting "
                                  f"(nor {' or '.join('data.' + k for k in REGIME_DATA)}: the other data keys "
                                  "shape the corpus, prepared before the choice)")
            if keys[0] == "train" and keys[1] in REGIME_FIXED:
                raise ConfigError(f"regime.set: {text!r}: the choice is made by, or after, train.{keys[1]}; "
                                  f"a regime cannot set {', '.join('train.' + k for k in REGIME_FIXED)}")


REGIME_DATA = ("sampling_alpha", "sampling_nbest")  # data keys a regime may set: they act on each batch drawn
REGIME_FIXED = ("regimes", "probe_steps", "max_time", "max_steps", "max_epochs", "precision", "device",
                "num_threads", "run_dir", "init_from", "dist_timeout",  # what the choice is made by
                "seed", "tensorboard", "valid_beam", "best_metric")  # what is used before the choice


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, validation and checkpointing."""

    run_dir: str = "runs/default"
    """Where config, tokenizer, checkpoints and metrics go (``mt train -o`` overrides it)."""
    seed: int = 1
    """Seeds the weights, dropout and the order of batches (each epoch's shuffle is seed + epoch)."""
    max_tokens: int = 4096
    """Token budget of a batch: sentences x longest side, padding included."""
    accum_steps: int = 1
    """Batches whose gradients are summed into one update."""
    max_steps: int = 0
    """Stop after this many updates; 0: no limit (then max_epochs must be set)."""
    max_epochs: int = 0
    """Stop after this many passes over the training data; 0: no limit."""
    max_time: str = ""
    """Stop after this much training time, e.g. 45s, 30m, 2h (empty: no limit); a final checkpoint follows."""
    optimizer: Literal["adam", "adamw"] = "adamw"
    """adam or adamw (decoupled weight decay)."""
    lr: float = 7e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 0.0
    """Where the cosine and linear schedules end."""
    schedule: Literal["inverse_sqrt", "cosine", "linear", "constant"] = "inverse_sqrt"
    """After linear warmup: inverse_sqrt (lr * sqrt(warmup/step)), cosine or linear (down to min_lr at the
    end of the budget: max_steps or max_time, whichever comes first) or constant."""
    warmup_steps: int = 4000
    """Updates over which the learning rate rises linearly from 0 to lr."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam's decay rates of the first and second moment estimates, each in [0, 1)."""
    adam_eps: float = 1e-8
    """Adam's epsilon (> 0), added to the root of the second moment."""
    weight_decay: float = 0.0
    """Weight decay (>= 0): decoupled with adamw, an L2 term with adam."""
    clip_norm: float = 1.0
    """Clip the gradient's global L2 norm to this; 0 disables clipping."""
    label_smoothing: float = 0.1
    """Share of the target probability spread uniformly over the vocabulary, in [0, 1)."""
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "auto"
    """fp32, bf16 or fp16 (autocast; weights and optimizer stay fp32; fp16, for GPUs without bf16, adds a
    dynamic loss scale), or auto: bf16 where the hardware has it natively (CPUs with AMX or AVX512-BF16,
    GPUs from Ampere on), fp16 on older GPUs, fp32 elsewhere; the choice is logged, written into the
    run's config.yaml and kept on resume."""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda or cuda:N."""
    num_threads: int = 0
    """CPU threads for torch; 0 keeps torch's default."""
    valid_every: int = 1000
    """Validate and checkpoint every this many updates (and at the end)."""
    log_every: int = 100
    """Write a training row to metrics.jsonl every this many updates."""
    tensorboard: bool = False
    """Also write metrics.jsonl's rows as TensorBoard event files into RUN/tensorboard (needs
    pip install tensorboard)."""
    save_every: int = 0
    """Also checkpoint (without validating) every this many updates; 0: only at validations."""
    keep_checkpoints: int = 5
    """Step checkpoints kept besides last.pt and best.pt; 0 keeps none."""
    average_last: int = 0
    """At the end, average the last N (>= 2) step checkpoints into checkpoints/average.pt and let
    validation decide between it and best.pt; 0 or 1: no averaging."""
    patience: int = 0
    """Stop after this many validations without a better best_metric; 0 disables early stopping."""
    valid_beam: int = 0
    """Also translate the validation source and report BLEU: 0 off, 1 greedy, k beam search of size k."""
    best_metric: Literal["nll", "bleu"] = "nll"
    """What picks best.pt and drives early stopping: nll (validation NLL) or bleu (needs valid_beam)."""
    init_from: str = ""
    """Fine-tune: start from the weights of this run directory (its checkpoint chosen on validation,
    else best.pt) or checkpoint file, with its tokenizer and a fresh optimizer, schedule and step. The
    model's shape must be the parent's (dropout may differ). Ignored when resuming."""
    init_keep_optimizer: bool = False
    """With init_from: keep the parent's optimizer state (Adam's moments) instead of a fresh one."""
    dist_timeout: str = "2h"
    """Under torchrun: how long a rank waits for the others (rank 0 prepares data and validates alone)."""
    prefetch: int = -1
    """Updates whose batches a background thread makes ahead (in pinned memory for a GPU) while one
    trains; 0: none, each made when needed; -1: 2 on CUDA, 0 on a CPU (whose update is long next to
    making its batch)."""
    regimes: list[RegimeConfig] = field(default_factory=list)
    """Settings chosen from the machine's measured speed (mt/adapt.py): before training, probe_steps
    updates at the base settings are timed, the epochs the budget affords at that pace are worked out,
    and the regime with the largest min_epochs within them is applied (none: the base settings). The
    choice is logged and written into the run's config.yaml (regimes then empty); resume keeps it."""
    probe_steps: int = 20
    """With regimes and max_time: the updates timed to measure the speed (after 3 untimed ones); their
    seconds count against max_time."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        _check_fields(self, "train")
        _positive("train.seed", self.seed, allow_zero=True)
        _positive("train.adam_eps", self.adam_eps)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _positive("train.min_lr", self.min_lr, allow_zero=True)
        _positive("train.max_tokens", self.max_tokens)
        _positive("train.accum_steps", self.accum_steps)
        _positive("train.max_steps", self.max_steps, allow_zero=True)
        _positive("train.max_epochs", self.max_epochs, allow_zero=True)
        parse_duration(self.max_time, "train.max_time")
        if not parse_duration(self.dist_timeout, "train.dist_timeout"):
            raise ConfigError("train.dist_timeout: must be a positive duration like 30m or 2h")
        _positive("train.lr", self.lr)
        _positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("train.valid_every", self.valid_every)
        _positive("train.log_every", self.log_every)
        _positive("train.keep_checkpoints", self.keep_checkpoints, allow_zero=True)
        _positive("train.save_every", self.save_every, allow_zero=True)
        _positive("train.average_last", self.average_last, allow_zero=True)
        if self.average_last > max(self.keep_checkpoints, 1):
            raise ConfigError(f"train.average_last ({self.average_last}) exceeds train.keep_checkpoints "
                              f"({self.keep_checkpoints}): the checkpoints to average would be pruned")
        _positive("train.patience", self.patience, allow_zero=True)
        _positive("train.clip_norm", self.clip_norm, allow_zero=True)
        _positive("train.valid_beam", self.valid_beam, allow_zero=True)
        if self.best_metric == "bleu" and not self.valid_beam:
            raise ConfigError("train.best_metric: bleu needs train.valid_beam >= 1")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("train.label_smoothing: must be in [0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas: must be two numbers in [0, 1), got {list(self.betas)}")
        _positive("train.probe_steps", self.probe_steps)
        if self.prefetch < -1:
            raise ConfigError(f"train.prefetch: must be -1 (auto), 0 (none) or the updates to make ahead, got {self.prefetch}")
        if self.regimes and not (self.max_time or self.max_steps or self.max_epochs):
            raise ConfigError("train.regimes: are chosen by the budget; set train.max_time, train.max_steps "
                              "or train.max_epochs")
        if self.schedule in ("cosine", "linear") and not (self.max_steps or self.max_time):
            raise ConfigError(f"train.schedule: {self.schedule} decays over the run's budget; "
                              "set train.max_steps or train.max_time")


@dataclass
class DecodeConfig:
    """Defaults for ``mt translate`` and validation BLEU; command-line options override them."""

    beam: int = 5
    """Beam size (1: greedy search)."""
    lenpen: float = 1.0
    """Length penalty alpha: hypotheses are ranked by log p / len**alpha (0: by log p)."""
    max_len_a: float = 1.2
    """Output length limit a * source_length + b tokens: a."""
    max_len_b: int = 10
    """Output length limit a * source_length + b tokens: b."""
    min_len: int = 1
    """Minimum output tokens before </s>."""
    batch_tokens: int = 2048
    """Source tokens per translation batch (small batches stay in the CPU caches)."""
    dtype: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    """Weights and activations when translating: fp32; bf16 (faster on CPUs with bf16 instructions;
    scores are still computed in fp32); int8 (CPU: linear layers in int8, one scale per weight row
    and per token, see mt/int8.py); or auto: the fastest of them on this hardware (bf16 on GPUs from
    Ampere on and on CPUs with native bf16 (AMX, AVX512-BF16), int8 on other x86 CPUs, else fp32;
    mt/device.py ``choose_dtype``)."""
    tune_beam: list[int] = field(default_factory=list)
    """After training, try these beam sizes on the validation split and make the best the run's
    default (RUN/decode.yaml); empty: keep ``beam``."""
    tune_lenpen: list[float] = field(default_factory=list)
    """Likewise for the length penalty; empty: keep ``lenpen``."""

    def __post_init__(self) -> None:
        _check_fields(self, "decode")
        _positive("decode.beam", self.beam)
        for beam in self.tune_beam:
            _positive("decode.tune_beam", beam)
        _positive("decode.batch_tokens", self.batch_tokens)
        _positive("decode.min_len", self.min_len, allow_zero=True)
        _positive("decode.max_len_a", self.max_len_a, allow_zero=True)
        _positive("decode.max_len_b", self.max_len_b, allow_zero=True)


@dataclass
class Config:
    """A whole configuration: one dataclass per section."""

    data: DataConfig = field(default_factory=DataConfig)
    """Corpora and cleaning."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """SentencePiece."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The Transformer's shape."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and checkpoints."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Translation defaults."""

    def __post_init__(self) -> None:
        if self.data.max_len > self.train.max_tokens:
            raise ConfigError(f"data.max_len ({self.data.max_len}) exceeds train.max_tokens "
                              f"({self.train.max_tokens}): a longest pair would not fit in a batch")
        if self.data.max_len > self.model.max_positions:
            raise ConfigError(f"data.max_len ({self.data.max_len}) exceeds model.max_positions "
                              f"({self.model.max_positions})")
        if self.data.sampling_alpha and self.tokenizer.type != "unigram" and not self.tokenizer.src_model:
            raise ConfigError(f"data.sampling_alpha: sampling segmentations needs tokenizer.type unigram, not "
                              f"{self.tokenizer.type}")

        thresholds = [regime.min_epochs for regime in self.train.regimes]
        if len(set(thresholds)) != len(thresholds):
            raise ConfigError(f"train.regimes: two regimes have the same min_epochs ({', '.join(f'{t:g}' for t in thresholds)})")
        for i, regime in enumerate(self.train.regimes):
            try:
                self.with_settings(regime.set)
            except ConfigError as e:
                raise ConfigError(f"train.regimes.{i}: {e}") from None

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def with_settings(self, settings: list[str]) -> Config:
        """This config with a regime's ``section.key=value`` settings applied (validated again as a
        whole) and no regimes left to choose from."""
        tree = self.to_dict()
        for text in settings:
            (section, key), value = parse_override(text)
            tree[section][key] = value
        tree["train"]["regimes"] = []
        return _build(Config, tree, "")


def _plain(value: Any) -> Any:
    """Tuples to lists, recursively, so the YAML stays plain."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, values: dict, where: str) -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {name!r}; valid keys{' in ' + where if where else ''}: "
                              f"{', '.join(fields)}")
        kwargs[key] = _coerce(hints[key], value, name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - fields all have defaults
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:  # a corpus or regime does not know where it sits: name it (data.train.1.weight)
        message = str(e)
        for named, placeholder in ((CorpusConfig, "corpus"), (RegimeConfig, "regime")):
            if cls is named and where and message.startswith(placeholder):
                raise ConfigError(where + message[len(placeholder):]) from None
        raise


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value if value is not None else {}, name)
    origin = typing.get_origin(hint)
    if origin is Literal:
        _choice(name, value, typing.get_args(hint))
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise ConfigError(f"{name}: expected a list of {len(typing.get_args(hint))}, got {value!r}")
        return tuple(_coerce(arg, v, name) for arg, v in zip(typing.get_args(hint), value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        given = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{name}: must be a finite number, got {given!r}")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    if origin is list:
        item = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(item) and isinstance(value, dict):
            value = [value]  # one corpus where a list of corpora may stand
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{name}.{i}" if dataclasses.is_dataclass(item) else name)
                for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):  # pragma: no cover - no unions in the schema yet
        return value
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.max_steps=100`` -> (["train", "max_steps"], 100); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _merge_override(tree: dict, path: list[str], value: Any, text: str) -> None:
    node = tree
    for part, following in zip(path[:-1], path[1:]):
        if isinstance(node, dict) and following.isdigit() and isinstance(node.get(part), dict):
            node[part] = [node[part]]  # data.train.0.src on one corpus given as a mapping
        if isinstance(node, list):  # data.train.1.src: an item of a list of corpora
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {text!r}: no item {part!r} in a list of {len(node)}")
            child = node[int(part)]
        else:
            child = node.get(part)
            if child is None:  # an empty section in the YAML
                child = node[part] = {}
        if isinstance(child, list) and not following.isdigit() and len(child) == 1:
            child = child[0]  # data.train.src on a list of one corpus
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node = child
    if isinstance(node, list):
        if not path[-1].isdigit() or int(path[-1]) >= len(node):
            raise ConfigError(f"override {text!r}: {path[-2]!r} is a list; name an item and a key "
                              f"(e.g. {'.'.join(path[:-1])}.0.{path[-1]})")
        node[int(path[-1])] = value
        return
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply ``key=value`` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        _merge_override(tree, keys, value, text)
    try:
        return _build(Config, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (the string literal that follows it), one
    line each: the config's documentation, also used for command-line help."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def config_from_dict(tree: dict) -> Config:
    return _build(Config, tree, "")


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    with atomic_write(path) as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False, allow_unicode=True)
