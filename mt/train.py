"""Training: the trainer and its state, the optimisation loop, validation, checkpoints, resume.

Teacher forcing (Vaswani et al., 2017): the decoder reads ``<s> y1 .. y(n-1)`` and is trained to
predict ``y1 .. yn </s>`` with label-smoothed cross-entropy (Szegedy et al., 2016) over non-pad
tokens. Adam(W) with linear warmup and an inverse-square-root (or cosine) decay, gradient clipping,
gradient accumulation, optional bf16 or fp16 autocast, several processes under torchrun (DDP). Everything that decides what happens next — model,
optimizer, sampler, ``TrainState`` (step, position in the data, best score, patience, time, logging
window), RNG states — is saved in each checkpoint by one ``Trainer.state_dict``, so ``resume``
continues the same run. The tokenizer and data come from ``mt.prepare``.
"""

from __future__ import annotations

import importlib.util
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar, get_type_hints

import numpy as np
import torch
from tqdm import tqdm

from mt import checkpoint as ckpt
from mt import adapt, finetune, tune
from mt.batch import Batch
from mt.config import Config, ConfigError, parse_duration
from mt.data import ParallelData, TokenBatchSampler, same_content
from mt.device import autocast, choose_precision, fused_adam, pick_device, slow_bf16_warning, with_settings_of
from mt.linear import fp32_gemm
from mt.distributed import Dist, quiet_unless_main
from mt.errors import MtError
from mt.evaluate import bleu
from mt.loss import batch_loss
from mt.model import Transformer
from mt.prefetch import Prefetcher
from mt.prepare import Prepared, describe_sampling, prepare, sampling_for, tokenizers_in_place
from mt.progress import bar as progress_bar
from mt.run import Run, check_weights, checkpoint_config
from mt.signals import StopSignals
from mt.tokenizer import Tokenizer
from mt.translate import validation_bleu

MAX_BAD_UPDATES = 5  # consecutive non-finite updates before training gives up
PREFETCH_DEPTH = 2  # updates made ahead on CUDA with train.prefetch=-1


class TrainingError(MtError):
    """Training cannot go on; the message says why."""


# --------------------------------------------------------------------------------------------------
# Pieces


class TeacherForced(torch.nn.Module):
    """The model and its loss as one module, so that DDP sees one forward per micro-batch."""

    def __init__(self, model: Transformer, epsilon: float):
        super().__init__()
        self.model, self.epsilon = model, epsilon

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return batch_loss(self.model, Batch(src, tgt_in, tgt_out, None), self.epsilon)


def learning_rate(step: int, cfg, budget_used: float | None = None) -> float:
    """LR for update number ``step`` (1-based): linear warmup, then the chosen decay.

    ``budget_used`` is the share of the run's budget spent so far (of ``max_steps`` or of
    ``max_time``, whichever is nearer its end; default ``step / max_steps``): the cosine and linear
    schedules reach ``min_lr`` when it reaches 1, so a time-budgeted run ends its decay on time."""
    warmup = cfg.warmup_steps
    if warmup and step <= warmup:
        return cfg.lr * step / warmup
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(warmup / step) if warmup else cfg.lr
    if cfg.schedule in ("cosine", "linear"):
        used = budget_used if budget_used is not None else (step / cfg.max_steps if cfg.max_steps else 0.0)
        warm = used * warmup / step  # the share warmup took, at the average pace so far (steps: warmup / max_steps)
        progress = min(max((used - warm) / max(1.0 - warm, 1e-9), 0.0), 1.0)
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1.0 - progress
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * decay
    return cfg.lr


# --------------------------------------------------------------------------------------------------
# Resuming


def _changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """``key old -> new`` for every setting that differs (the run directory aside)."""
    changed = []
    for key in sorted(set(before) | set(after)):
        a, b, name = before.get(key), after.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{name}.")
        elif (isinstance(a, list) and isinstance(b, list) and len(a) == len(b)
              and all(isinstance(x, dict) for x in a + b)):  # corpora: data.train.src, or data.train.1.src
            for i, (x, y) in enumerate(zip(a, b)):
                changed += _changed_keys(x, y, f"{name}.{i}." if len(a) > 1 else f"{name}.")
        elif a != b and name != "train.run_dir":
            changed.append(f"{name} {a!r} -> {b!r}")
    return changed


@dataclass
class Resumed:
    """The checkpoint a run resumes from, checked against the config (see ``resumable``)."""

    path: Path
    state: dict
    trained_with: dict | None  # the tokenizers' fingerprints (absent from checkpoints before them)

    def check_tokenizers(self, run: Run, cfg: Config) -> Callable[[Tokenizer, Tokenizer], None]:
        """A check that the run's tokenizers are the ones this checkpoint was trained with."""
        def check(src_tok: Tokenizer, tgt_tok: Tokenizer) -> None:
            if self.trained_with and self.trained_with != {"src": src_tok.fingerprint, "tgt": tgt_tok.fingerprint}:
                raise TrainingError(f"{self.path}: trained with another tokenizer than "
                                    f"{run.tokenizer_paths(cfg.tokenizer.joint)[0]} (the fingerprints differ)")
        return check


def resumable(cfg: Config, run: Run, log: Callable[[str], None]) -> Resumed:
    """The run's newest checkpoint, once it is clear that resuming it with ``cfg`` continues the same
    run: same model shape and tokenizer layout, weights that fit them, the same training corpus
    content, the run's tokenizer present (or given again, identical). Other changed settings are
    logged; ``max_steps`` or ``max_time`` may be raised on purpose."""
    path, state = run.resume_state(log)
    saved = checkpoint_config(path, state)
    cfg, kept = adapt.as_started(cfg, saved, state.get("regime"))  # the regime chosen when the run started
    if kept:
        log("the run's regime holds: " + ", ".join(kept))
    if saved.model != cfg.model or saved.tokenizer.joint != cfg.tokenizer.joint:
        raise TrainingError(f"{path}: the model or tokenizer settings differ from the checkpoint's; "
                            "resume with the run's own config.yaml")
    check_weights(path, state, saved)
    keys = state.get("corpus", {}).get("train")  # absent from checkpoints before content keys
    keys = [keys] if isinstance(keys, dict) else keys  # one corpus, before lists of corpora
    if keys and len(keys) != len(cfg.data.train):
        raise TrainingError(f"data.train: {len(cfg.data.train)} corpora, but {path} was trained on {len(keys)}")
    for key, corpus in zip(keys or [], cfg.data.train):
        if corpus.is_set and not same_content(key, corpus):
            raise TrainingError(f"data.train: {corpus.describe()} is not the corpus {path} was trained on "
                                "(its content changed); resume needs that corpus, or start a new run")
    mine = cfg.to_dict()
    if mine["train"]["precision"] == "auto":  # keeps the precision the run started with
        mine["train"]["precision"] = saved.train.precision
    changed = _changed_keys(saved.to_dict(), mine)
    if changed:
        log("resuming with changed settings: " + ", ".join(changed))
    missing = [p for p in run.tokenizer_paths(cfg.tokenizer.joint) if not p.exists()]
    given = {"src": cfg.tokenizer.src_model, "tgt": cfg.tokenizer.tgt_model or cfg.tokenizer.src_model}
    trained_with = state.get("tokenizer")
    if missing and not (cfg.tokenizer.src_model and trained_with and all(
            Tokenizer(given[side]).fingerprint == trained_with[side] for side in ("src", "tgt"))):
        raise TrainingError(f"{missing[0]}: missing; {path} was trained with it (another tokenizer would not "
                            "match the weights)")
    return Resumed(path, state, trained_with)


# --------------------------------------------------------------------------------------------------
# The trainer


@dataclass
class TrainState:
    """The training loop's own state, saved in every checkpoint next to the model, optimizer,
    sampler and RNG states. Where training is in the data is (``epoch``, ``batch``): the sampler
    derives an epoch's batches from (seed, epoch), so resuming jumps there."""

    VERSION: ClassVar[int] = 2

    step: int = 0  # optimizer updates done (skipped non-finite ones included)
    epoch: int = 0  # 0-based epoch of the batches being used (advanced when its next batch is taken)
    batch: int = 0  # batches of that epoch already used
    best_metric: str = "loss"  # what ``best`` measures (train.best_metric); fixed for a run
    best: float = math.inf  # best validation value so far
    bad_validations: int = 0  # validations since the best one (the patience count)
    elapsed: float = 0.0  # training seconds so far, across resumes (data preparation excluded)
    window_tokens: int = 0  # the logging window: what the next train row of metrics.jsonl averages
    window_loss: float = 0.0
    window_nll: float = 0.0

    def state_dict(self) -> dict:
        return {"version": self.VERSION, **asdict(self)}

    def load_state_dict(self, state: dict) -> None:
        """Load a saved state, checking its version, the type of every field and its range."""
        if not isinstance(state, dict):
            raise ValueError(f"expected a dict, found {type(state).__name__}")
        if state.get("version") != self.VERSION:
            raise ValueError(f"version {state.get('version')} is not {self.VERSION} (written by another mt; "
                             "its weights still translate, but resuming needs a new run)")
        values = {}
        for name, kind in get_type_hints(TrainState).items():
            if name == "VERSION":
                continue
            if name not in state:
                raise ValueError(f"{name}: missing")
            value = state[name]
            allowed = (int, float) if kind is float else kind
            if not isinstance(value, allowed) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is not of type {kind.__name__}")
            values[name] = kind(value)
        negative = [n for n, v in values.items() if isinstance(v, (int, float)) and n != "best" and not v >= 0]
        if negative or math.isnan(values["best"]) or not math.isfinite(values["elapsed"]):
            bad = negative[0] if negative else ("best" if math.isnan(values["best"]) else "elapsed")
            raise ValueError(f"{bad}={values[bad]!r} is out of range")
        for name, value in values.items():
            setattr(self, name, value)


def batch_stream(sampler: TokenBatchSampler, state: TrainState, max_epochs: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, example indices) batch by batch from ``state``'s position (epoch, batches done),
    across epochs, advancing it as batches are taken; ends after ``max_epochs`` epochs (0: never)."""
    while not max_epochs or state.epoch < max_epochs:
        epoch = sampler.batches(state.epoch)
        while state.batch < len(epoch):
            state.batch += 1
            yield state.epoch, epoch[state.batch - 1]
        state.epoch, state.batch = state.epoch + 1, 0


def update_indices(sampler: TokenBatchSampler, state: TrainState, max_epochs: int,
                   per_update: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Each update's batches (``per_update``: every rank's) as (epoch, indices), from ``state``'s
    position, advancing it; ends with the data (after ``max_epochs``). The last update of the data
    may hold fewer."""
    stream = batch_stream(sampler, state, max_epochs)
    while update := [i for _, i in zip(range(per_update), stream)]:
        yield update


class RngStates:
    """Every rank's Python and torch (CPU and its CUDA device) generators, which drive dropout: one
    stateful part, a list in rank order (gathering it is collective)."""

    def __init__(self, d: Dist):
        self.dist = d

    def state_dict(self) -> dict:
        return {"ranks": self.dist.gather(ckpt.rng_state())}

    def load_state_dict(self, state: dict) -> None:
        """Each rank takes its own; with another world size, ranks past the saved ones keep their
        seeding (the batches, not the dropout masks, decide what resuming must reproduce)."""
        ranks = state["ranks"] if "ranks" in state else [state]  # one process, before per-rank states
        if self.dist.rank < len(ranks):
            ckpt.set_rng_state(ranks[self.dist.rank])


class LossScale:
    """fp16's dynamic loss scale (``torch.amp.GradScaler``) as a stateful part; a no-op otherwise."""

    def __init__(self, device: torch.device, enabled: bool):
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"expected a dict, found {type(state).__name__}")
        if self.scaler.is_enabled() and state:  # a run that switches to fp16 starts a fresh scale
            self.scaler.load_state_dict(state)


class _NoMetrics:
    """What the ranks other than 0 write to metrics.jsonl: nothing."""

    def write(self, **row) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Trainer:
    """One run's model, optimizer, sampler and ``TrainState``, and the loop that updates them.

    ``parts()`` lists every stateful piece; ``state_dict`` and ``load_state_dict`` both walk that list,
    so a checkpoint holds exactly what resuming restores."""

    def __init__(self, cfg: Config, run: Run, model: Transformer, data: Prepared, device: torch.device,
                 log: Callable[[str], None], progress: bool | None = None, d: Dist | None = None):
        tc = self.tc = cfg.train
        self.cfg, self.run, self.model, self.data, self.device, self.log = cfg, run, model, data, device, log
        self.dist = d or Dist()
        self.progress = progress if self.dist.main else False
        self.loss = TeacherForced(model, tc.label_smoothing)
        # the buffers (sinusoidal positions) are constants: no need to broadcast them every forward
        self.ddp = (torch.nn.parallel.DistributedDataParallel(
            self.loss, device_ids=[device] if device.type == "cuda" else None, forward_sync_buffers=False)
            if self.dist.on else None)
        optimizer_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_cls(model.parameters(), lr=tc.lr, betas=tc.betas, eps=tc.adam_eps,
                                       weight_decay=tc.weight_decay, fused=fused_adam(device))
        self.sampler = data.train.sampler(tc.max_tokens, shuffle=True, seed=tc.seed)
        self.higher_is_better = tc.best_metric == "bleu"
        self.state = TrainState(best_metric=tc.best_metric, best=-math.inf if self.higher_is_better else math.inf)
        self.budget = parse_duration(tc.max_time, "train.max_time")
        self.rng = RngStates(self.dist)
        self.scale = LossScale(device, enabled=tc.precision == "fp16")
        self.metrics = run.metrics(tc.tensorboard) if self.dist.main else _NoMetrics()
        self.saved_step = -1  # the step whose state is in last.pt
        self.signal = 0  # the signal that stopped training, or 0
        self.regime: dict | None = None  # the train.regimes choice: its index (-1: none) and settings
        # updates whose batches a thread makes ahead (mt/prefetch.py); 0: each made when needed
        self.prefetch_depth = tc.prefetch if tc.prefetch >= 0 else PREFETCH_DEPTH if device.type == "cuda" else 0
        self._tick = self._window_start = self._window_data = 0.0  # clocks, started by fit

    # state ----------------------------------------------------------------------------------------

    def parts(self) -> dict[str, object]:
        """The stateful parts, by checkpoint key, in the order they are saved and restored."""
        return {"trainer": self.state, "model": self.model, "optimizer": self.optimizer, "sampler": self.sampler,
                "scale": self.scale, "rng": self.rng}

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts().items()}

    def load_state_dict(self, state: dict, source: Path) -> None:
        for name, part in self.parts().items():
            if name == "scale" and name not in state:
                state = {**state, "scale": {}}  # checkpoints before fp16: no loss scale
            if name not in state:
                raise TrainingError(f"{source}: has no {name} state to resume from")
            try:
                part.load_state_dict(with_settings_of(part, state[name]) if part is self.optimizer else state[name])
            except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
                raise TrainingError(f"{source}: cannot resume its {name} state: {e}") from None
        s = self.state
        if s.batch > len(self.sampler.batches(s.epoch)):
            raise TrainingError(f"{source}: cannot resume its trainer state: batch {s.batch} of epoch {s.epoch + 1}, "
                                f"which has {len(self.sampler.batches(s.epoch))}")
        if s.best_metric != self.tc.best_metric:
            raise TrainingError(f"{source}: the run picked best.pt by {s.best_metric}, "
                                f"not train.best_metric={self.tc.best_metric}")
        self.saved_step = self.state.step

    def save(self, valid: dict | None, best: bool) -> None:
        """Checkpoint the current state (with what it was trained on, for inference and resume).
        Every rank takes part (the RNG states are gathered); rank 0 writes."""
        self._clock()
        state = self.state_dict()

        def write() -> None:  # rank 0; its failure (a full disk) reaches the others, who would wait
            src_tok, tgt_tok = self.data.src_tok, self.data.tgt_tok
            checkpoint = {
                "format": "mt", "version": ckpt.FORMAT_VERSION, "config": self.cfg.to_dict(),
                "vocab": {"src": src_tok.vocab_size, "tgt": tgt_tok.vocab_size},
                "tokenizer": {"src": src_tok.fingerprint, "tgt": tgt_tok.fingerprint},
                "corpus": {"train": self.data.corpus_key}, "valid": valid or {},
                "update_batches": self.tc.accum_steps * self.dist.world, **state,
                **({"regime": self.regime} if self.regime is not None else {}),
            }
            self.run.save_checkpoint(checkpoint, self.state.step, best=best, keep=self.tc.keep_checkpoints)

        self.dist.on_main(write)
        self.saved_step = self.state.step

    # pieces of the loop -----------------------------------------------------------------------------

    def _clock(self) -> float:
        """Add the seconds since the last call to ``state.elapsed``; return it."""
        now = time.time()
        self.state.elapsed += now - self._tick
        self._tick = now
        return self.state.elapsed

    def stop_reason(self, signals: StopSignals) -> str:
        """Why training must stop before the next update, or "". Decided together: a signal or the
        time budget on any rank stops every rank at the same step."""
        tc, s = self.tc, self.state
        # every rank uses the slowest clock: the same time budget and the same LR on every rank
        received, s.elapsed = self.dist.max([signals.received, self._clock()])
        received, timed_out = int(received), s.elapsed >= self.budget > 0
        if received:
            self.signal = received
            return f"interrupted by {signal.Signals(received).name}"
        if timed_out:
            return f"reached train.max_time={tc.max_time}"
        if tc.max_steps and s.step >= tc.max_steps:
            return f"reached train.max_steps={tc.max_steps}"
        if tc.patience and s.bad_validations >= tc.patience:  # checked first thing: a resumed early-stopped run
            return f"early stopping: no improvement in {tc.patience} validations"
        return ""

    def learning_rate(self) -> float:
        """This update's LR; the budget used is the larger share of max_steps and max_time."""
        tc, s = self.tc, self.state
        used = max(s.step / tc.max_steps if tc.max_steps else 0.0, s.elapsed / self.budget if self.budget else 0.0)
        return learning_rate(s.step, tc, budget_used=used)

    def record(self, kind: str, **fields) -> None:
        """A row of metrics.jsonl (rank 0 writes it): its kind, step, epoch and training seconds so far."""
        s = self.state
        self.dist.on_main(lambda: self.metrics.write(kind=kind, step=s.step, epoch=s.epoch + 1,
                                                     elapsed=round(s.elapsed, 3), **fields))

    def log_row(self, *, lr: float, grad_norm: float, bar: tqdm) -> None:
        """A train row of metrics.jsonl: the window's per-token loss, throughput, LR, gradient norm."""
        s = self.state
        seconds = max(time.time() - self._window_start, 1e-9)
        row = {"loss": s.window_loss / s.window_tokens, "nll": s.window_nll / s.window_tokens, "lr": lr,
               "tokens_per_s": s.window_tokens / seconds, "grad_norm": grad_norm,
               "data_share": self._window_data / seconds}  # of the time, spent making batches
        self.record("train", **row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        s.window_tokens, s.window_loss, s.window_nll = 0, 0.0, 0.0
        self._window_start, self._window_data = time.time(), 0.0

    def validate_and_save(self) -> None:
        """Validate (loss, and BLEU with ``valid_beam``), log, track the best and patience, save."""
        tc, s, valid_data = self.tc, self.state, self.data.valid
        if valid_data is None:
            return self.save(None, best=True)  # without validation the newest model is the best

        def run_validation() -> dict:
            result = validate(self.model, valid_data, max_tokens=tc.max_tokens, epsilon=tc.label_smoothing,
                              device=self.device, precision=tc.precision)
            if tc.valid_beam:
                result["bleu"] = validation_bleu(self.model, valid_data.src_text, valid_data.tgt_text,
                                                 self.data.src_tok, self.data.tgt_tok,
                                                 replace(self.cfg.decode, beam=tc.valid_beam), self.cfg.data.tgt_lang,
                                                 progress=self.progress)
            return result

        result = self.dist.on_main(run_validation)  # rank 0 validates; every rank gets its numbers
        value = result[tc.best_metric]
        improved = value > s.best if self.higher_is_better else value < s.best
        s.best, s.bad_validations = (value, 0) if improved else (s.best, s.bad_validations + 1)
        self.record("valid", **result, best=improved)
        self.log(f"step {s.step}: valid loss {result['loss']:.4f} nll {result['nll']:.4f} ppl {result['ppl']:.2f}"
                 + (f" bleu {result['bleu']:.2f}" if "bleu" in result else "")
                 + (" (best)" if improved else f" (no improvement for {s.bad_validations})"))
        self.save(result, best=improved)

    def accumulate(self, group: list[Batch]) -> tuple[int, float, float]:
        """Forward and backward over this rank's micro-batches of the update; return the update's
        target tokens, summed loss and NLL over all ranks. Each loss is divided by the update's
        token count over all ranks (times the world size, which DDP's gradient mean divides out), so
        neither accumulation nor the number of ranks changes the gradients. A rank left without a
        batch at the end of the data runs a zero-weight one: every rank must join the all-reduce."""
        tc, d = self.tc, self.dist
        tokens = int(d.sum([sum(b.num_tgt_tokens for b in group)])[0])
        work = group or [self.data.train.batch(self.sampler.batches(0)[0])]
        loss_total = nll_total = 0.0
        for k, batch in enumerate(work):
            batch = batch.to(self.device)
            last = k == len(work) - 1  # DDP all-reduces the gradients in this one's backward only
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                with autocast(self.device, tc.precision):
                    loss, nll = (self.ddp or self.loss)(batch.src, batch.tgt_in, batch.tgt_out)
                self.scale.scaler.scale(loss * (d.world / tokens if group else 0.0)).backward()
            if group:
                loss_total, nll_total = loss_total + loss.item(), nll_total + nll.item()
        loss_total, nll_total = d.sum([loss_total, nll_total])
        return tokens, loss_total, nll_total

    # the loop ---------------------------------------------------------------------------------------

    def fit(self) -> str:
        """Train until a stop condition holds; return it. The final state is validated and saved
        (after a signal: saved at once, validating could take long)."""
        tc, s, model, optimizer, d = self.tc, self.state, self.model, self.optimizer, self.dist
        # every rank reads the same stream: an update takes accum_steps batches per rank
        per_update, share = tc.accum_steps * d.world, slice(d.rank * tc.accum_steps, (d.rank + 1) * tc.accum_steps)
        updates = update_indices(self.sampler, s, tc.max_epochs, per_update)
        ahead = (u[share] for u in update_indices(self.sampler, replace(s), tc.max_epochs, per_update))  # a copy's
        bar = progress_bar(self.progress, total=tc.max_steps or None, initial=s.step, unit="step")
        model.train()
        self._tick = self._window_start = time.time()  # the time budget counts training, not preparation
        bad_updates = 0
        def make(drawn: tuple[int, np.ndarray]) -> Batch:
            epoch, indices = drawn
            return self.data.train.batch(indices, epoch)

        with StopSignals() as signals, Prefetcher(ahead, make, depth=self.prefetch_depth,
                                                  pin=self.device.type == "cuda") as batches:
            while not (stopped := self.stop_reason(signals)):
                started = time.time()
                update = next(updates, None)
                if update is None:
                    stopped = f"reached train.max_epochs={tc.max_epochs}"
                    break
                s.step += 1
                lr = self.learning_rate()
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                group = batches.get(update[share])
                self._window_data += time.time() - started
                tokens, loss_total, nll_total = self.accumulate(group)
                scaler = self.scale.scaler
                scaler.unscale_(optimizer)  # clipping sees the true gradients (fp16: unscaled first)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm or float("inf"))
                if not (math.isfinite(loss_total) and torch.isfinite(grad_norm)):
                    # skip the update rather than poison the weights; give up if it keeps happening
                    optimizer.zero_grad(set_to_none=True)
                    if scaler.is_enabled() and math.isfinite(loss_total):  # fp16 overflow: a lower scale, again
                        scaler.update()
                        self.log(f"step {s.step}: fp16 gradients overflowed, loss scale lowered to {scaler.get_scale():g}")
                        continue
                    scaler.update()  # fp16: the scale is ready for the next unscale_ (else a no-op)
                    bad_updates += 1
                    self.log(f"step {s.step}: non-finite loss or gradient, update skipped ({bad_updates} in a row)")
                    if bad_updates >= MAX_BAD_UPDATES:
                        raise TrainingError(f"{bad_updates} non-finite updates in a row at step {s.step}; lower "
                                            "train.lr, raise train.warmup_steps or use train.precision=fp32")
                    continue
                bad_updates = 0
                scaler.step(optimizer)  # optimizer.step(), unless fp16 found an overflow
                scaler.update()
                optimizer.zero_grad(set_to_none=True)

                s.window_tokens, s.window_loss, s.window_nll = (s.window_tokens + tokens, s.window_loss + loss_total,
                                                                s.window_nll + nll_total)
                bar.update(1)
                if s.step % tc.log_every == 0 or s.step == 1:
                    self.log_row(lr=lr, grad_norm=float(grad_norm), bar=bar)
                if s.step % tc.valid_every == 0:
                    self.validate_and_save()
                elif tc.save_every and s.step % tc.save_every == 0:
                    self.save(None, best=False)
        bar.close()
        if self.saved_step != s.step and self.signal:
            self.save(None, best=False)
        elif self.saved_step != s.step:
            self.validate_and_save()
        return stopped


# --------------------------------------------------------------------------------------------------
# Entry point


@dataclass
class TrainResult:
    step: int
    epoch: int
    best: float  # best validation value of train.best_metric (inf / -inf without validation)
    stopped: str  # why training ended
    run_dir: Path
    signal: int = 0  # the signal that interrupted training (its checkpoint was saved), or 0


@torch.no_grad()
def validate(model: Transformer, data: ParallelData, *, max_tokens: int, epsilon: float,
             device: torch.device, precision: str) -> dict:
    """Per-token label-smoothed loss, NLL and perplexity over a whole split."""
    was_training = model.training
    model.eval()
    loss_sum = nll_sum = 0.0
    tokens = 0
    budget = max(max_tokens, int(data.lengths.max()))  # long pairs: a batch alone
    for indices in data.sampler(budget, shuffle=False).batches(0):
        batch = data.batch(indices).to(device)
        with autocast(device, precision):
            loss, nll = batch_loss(model, batch, epsilon)
        loss_sum, nll_sum, tokens = loss_sum + loss.item(), nll_sum + nll.item(), tokens + batch.num_tgt_tokens
    model.train(was_training)
    nll = nll_sum / tokens
    return {"loss": loss_sum / tokens, "nll": nll, "ppl": math.exp(min(nll, 50.0)), "tokens": tokens}


def train(cfg: Config, *, resume: bool = False, log: Callable[[str], None] | None = None,
          progress: bool | None = None) -> TrainResult:
    """Train the model described by ``cfg`` into ``cfg.train.run_dir``; return where it stopped. The
    run directory is locked for the whole of it. Under torchrun, every rank calls this: rank 0 holds
    the lock, prepares the data and writes; all train one model with DDP."""
    d = Dist.from_env()
    log = quiet_unless_main(d, log or (lambda message: print(message, file=sys.stderr)))
    tc = cfg.train
    if not (tc.max_steps or tc.max_epochs or tc.max_time or (tc.patience and cfg.data.valid.is_set)):
        raise ConfigError("training would never stop: set train.max_steps, train.max_epochs, train.max_time "
                          "or train.patience (with data.valid)")
    parent = None
    if tc.init_from and not resume:  # fine-tuning; a resumed run already holds what it started from
        parent = finetune.find_parent(tc.init_from)
        cfg = finetune.adopt(cfg, parent)  # the parent's tokenizer, once its model shape is checked
        for i, regime in enumerate(cfg.train.regimes):  # and the shape each regime would give
            try:
                finetune.adopt(cfg.with_settings(regime.set), parent)
            except ConfigError as e:
                raise ConfigError(f"train.regimes.{i}: {e}") from None
    if tc.valid_beam or cfg.decode.tune_beam or cfg.decode.tune_lenpen:
        bleu(cfg.data.tgt_lang)  # a target whose BLEU tokenizer is missing fails now, not at the first validation
    if tc.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard: true needs the tensorboard package: pip install tensorboard")
    device = pick_device(d.device(tc.device))
    d.start(device, parse_duration(tc.dist_timeout, "train.dist_timeout"))
    try:
        run = Run(tc.run_dir)
        d.on_main(lambda: run.open_for_training(resume, in_place=tokenizers_in_place(cfg, run)))
        try:
            result = _train(cfg, run, resume, run.logging_to_file(log) if d.main else log, progress, d, device,
                            parent)
        finally:
            if d.main:
                run.close()
        d.barrier()  # the ranks end together: none takes the process group down while another still uses it
        return result
    finally:
        d.stop()


def _train(cfg: Config, run: Run, resume: bool, log: Callable[[str], None], progress: bool | None,
           d: Dist, device: torch.device, parent: finetune.Parent | None) -> TrainResult:
    tc = cfg.train
    resumed: Resumed | None = None

    def check_resume() -> Path | None:  # rank 0 checks; the others read the checkpoint it chose
        nonlocal resumed
        resumed = resumable(cfg, run, log) if resume else None
        return resumed.path if resumed else None

    path = d.on_main(check_resume)
    if path is not None and not d.main:
        resumed = Resumed(path, ckpt.load(path), None)
    if resumed is not None:
        cfg, _ = adapt.as_started(cfg, checkpoint_config(resumed.path, resumed.state), resumed.state.get("regime"))
        tc = cfg.train
    chose = ""
    if tc.precision == "auto":  # chosen once, when the run starts, and written into its config
        if resumed is not None:
            chosen, why = checkpoint_config(resumed.path, resumed.state).train.precision, "as the run started"
        else:  # rank 0's choice for all (nodes of a run might differ)
            chosen, why = d.on_main(lambda: choose_precision("auto", device))
        cfg = replace(cfg, train=replace(tc, precision=chosen))
        tc = cfg.train
        chose = f"precision: {chosen} ({why})"  # said once the data is known to be usable
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    # a resumed run keeps its seed for the weighted mixture too (the sampler adopts the saved one)
    saved = resumed.state.get("sampler") if resumed else None
    seed = saved["seed"] if isinstance(saved, dict) and isinstance(saved.get("seed"), int) else tc.seed

    def prepare_here() -> Prepared:
        data = prepare(cfg, run, log, check=resumed.check_tokenizers(run, cfg) if resumed else None,
                       progress=progress if d.main else False, seed=seed)
        if d.main:
            run.save_config(cfg)
        return data

    # rank 0 trains the tokenizer and fills the cache first; then the others read them
    prepared: list[Prepared] = []
    d.on_main(lambda: prepared.append(prepare_here()))
    data = prepared[0] if d.main else prepare_here()
    if chose:
        log(chose)  # the data is usable: say how it will be trained on
    if tc.precision == "fp32" and device.type == "cpu":
        log("fp32 matrix products: {} ({})".format(*fp32_gemm()))
    if tc.precision == "bf16" and (bf16_warning := slow_bf16_warning(device)):
        log(f"warning: {bf16_warning} (train.precision=fp32)")
    budget = regime = None
    if tc.regimes:  # a new run (a resumed one keeps its choice): the regime the measured speed affords
        if tc.max_time:
            log(f"timing {tc.probe_steps} updates at the base settings (after {adapt.UNTIMED_UPDATES} untimed, and "
                "once untimed themselves) to choose among train.regimes")
        base = cfg.data
        cfg, budget, regime, said = adapt.adapt(cfg, data, device, d)
        tc = cfg.train
        resampled = (cfg.data.sampling_alpha, cfg.data.sampling_nbest) != (base.sampling_alpha, base.sampling_nbest)
        if resampled:  # the regime's subword regularisation, from the first batch on (refused before it is saved)
            data.train.sampling = sampling_for(cfg, data.src_tok, data.tgt_tok, seed)
        d.on_main(lambda: run.save_config(cfg))
        log(said)
        if resampled:
            log(describe_sampling(data.train.sampling) if data.train.sampling else "train: no subword regularisation")
        random.seed(tc.seed)
        torch.manual_seed(tc.seed)  # as if there had been no probe

    model = Transformer(cfg.model, data.src_tok.vocab_size, data.tgt_tok.vocab_size,
                        joint=cfg.tokenizer.joint).to(device)
    if d.on:
        torch.manual_seed(tc.seed + d.rank)  # the same initial weights, dropout of its own on each rank
    trainer = Trainer(cfg, run, model, data, device, log, progress, d)
    s = trainer.state
    if budget is not None:
        trainer.regime = regime
        s.elapsed = budget.probe_seconds  # the probe's time counts against train.max_time
        trainer.record("regime", regime=regime["index"], epochs=budget.epochs,
                       updates_per_epoch=budget.updates_per_epoch, seconds_per_update=budget.seconds_per_update,
                       probe_seconds=budget.probe_seconds)
    if parent is not None:
        finetune.load_into(parent, model, trainer.optimizer if tc.init_keep_optimizer else None)
        log(f"initialised from {parent.path} (its step {parent.state.get('trainer', {}).get('step', '?')}); "
            + ("its optimizer state kept" if tc.init_keep_optimizer else "a fresh optimizer") + ", step 0")
    if resumed is not None:
        trainer.load_state_dict(resumed.state, resumed.path)
        trainer.regime = resumed.state.get("regime")  # later checkpoints keep the run's choice
        trainer.metrics.truncate_after(s.step)  # rows a killed run logged after its last checkpoint
        epoch_size = len(trainer.sampler.batches(s.epoch))
        log(f"resumed from {resumed.path} at step {s.step} (epoch {s.epoch + 1}, batch {s.batch}/{epoch_size})")
        before, now = resumed.state.get("update_batches", tc.accum_steps), tc.accum_steps * d.world
        if before != now:
            log(f"warning: an update now takes {now} batches (processes x train.accum_steps), not {before}: "
                "the run goes on over the same data, with other update sizes from here")
    else:
        log(f"model: {model.num_parameters():,} parameters, {cfg.model.encoder_layers}+{cfg.model.decoder_layers} "
            f"layers, d_model {cfg.model.d_model}; device {device}, {tc.precision}"
            + (f"; {d.world} processes" if d.on else ""))
    d.on_main(lambda: run.disk_check(model))

    initial_step = s.step
    stopped = trainer.fit()
    log(f"stopped at step {s.step}: {stopped}" + ("; checkpoint saved, continue with --resume" if trainer.signal else ""))
    trainer.record("end", reason=stopped, **{f"best_{tc.best_metric}": s.best})
    trainer.metrics.close()
    wants_tuning = tc.average_last >= 2 or cfg.decode.tune_beam or cfg.decode.tune_lenpen
    if d.main:  # what follows writes files, and needs no other rank
        if s.step != initial_step:  # the model changed: an earlier choice no longer holds
            run.drop_tuning()
        if data.valid is not None and wants_tuning and not run.has_defaults() and not trainer.signal:
            tune.choose_defaults(cfg, run, data.valid.src_text, data.valid.tgt_text, str(device), log,
                                 progress=trainer.progress)
    return TrainResult(step=s.step, epoch=s.epoch + 1, best=s.best, stopped=stopped, run_dir=run.path,
                       signal=trainer.signal)
