"""Training: data and tokenizer preparation, the optimisation loop, validation, checkpoints.

Teacher forcing (Vaswani et al., 2017): the decoder reads ``<s> y1 .. y(n-1)`` and is trained to
predict ``y1 .. yn </s>`` with label-smoothed cross-entropy (Szegedy et al., 2016) over non-pad
tokens. Adam(W) with linear warmup and an inverse-square-root (or cosine) decay, gradient clipping,
gradient accumulation, optional bf16 autocast. Everything that decides what happens next — model,
optimizer, step, epoch, sampler position, best score, RNG states — is saved in each checkpoint, so
``resume`` continues the same run.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mt import checkpoint as ckpt
from mt import tune
from mt.batch import Batch
from mt.config import Config, ConfigError, parse_duration
from mt.data import ParallelData, clean, content_key, load_corpus, same_content, tokenize
from mt.device import autocast, pick_device, slow_bf16_warning
from mt.errors import MtError
from mt.loss import linear_label_smoothed_loss
from mt.model import Transformer
from mt.run import Run, check_weights, checkpoint_config
from mt.signals import StopSignals
from mt.tokenizer import PAD_ID, Tokenizer, train_sentencepiece
from mt.translate import validation_bleu

TRAINER_STATE_VERSION = 1
MAX_BAD_UPDATES = 5  # consecutive non-finite updates before training gives up


class TrainingError(MtError):
    """Training cannot go on; the message says why."""


# --------------------------------------------------------------------------------------------------
# Pieces


def batch_loss(model: Transformer, batch: Batch, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced summed label-smoothed loss and NLL of a batch. The output projection and the
    loss run together, chunk by chunk, and only where there is a target token (padding costs no
    vocabulary-sized matmul, and the (N, V) logits are never stored)."""
    hidden = model.decode_hidden(batch.tgt_in, model.encode(batch.src))  # (B, T, D)
    keep = batch.tgt_out != PAD_ID
    return linear_label_smoothed_loss(hidden[keep], model.output_weight, batch.tgt_out[keep], epsilon)


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
# Run directory, tokenizer, data


def _text_stream(ds, column: str) -> Iterator[str]:
    for batch in ds.iter(batch_size=10_000):
        yield from batch[column]


def tokenizers_in_place(cfg: Config, run: Run) -> tuple[Path, ...]:
    """The configured tokenizer files that already are the run's own files (``mt tokenizer train -o
    RUN/spm.model``): used where they are, never replaced."""
    ours = {p.resolve() for p in run.tokenizer_paths(cfg.tokenizer.joint)}
    named = [Path(m) for m in (cfg.tokenizer.src_model, cfg.tokenizer.tgt_model) if m]
    return tuple(p for p in named if p.resolve() in ours)


def prepare_tokenizers(cfg: Config, run: Run, train_ds, log: Callable[[str], None]) -> tuple[Tokenizer, Tokenizer]:
    """Reuse the run's tokenizer, copy the configured one in, or train SentencePiece on ``train_ds``."""
    tok = cfg.tokenizer
    src_path, tgt_path = run.tokenizer_paths(tok.joint)
    if src_path.exists() and tgt_path.exists():
        return Tokenizer(src_path), Tokenizer(tgt_path)
    if tok.src_model:
        if not tok.joint and not tok.tgt_model:
            raise ConfigError("tokenizer.tgt_model: needed with tokenizer.src_model when joint is false")
        for given, path in ((tok.src_model, src_path), (tok.tgt_model, tgt_path)):
            if given and not path.exists():
                run.own(path)
                Tokenizer(given).save(path)
        return Tokenizer(src_path), Tokenizer(tgt_path)
    options = dict(vocab_size=tok.vocab_size, model_type=tok.type, character_coverage=tok.character_coverage,
                   input_sentence_size=tok.input_sentence_size)
    t0 = time.time()
    if tok.joint:
        def both() -> Iterator[str]:
            yield from _text_stream(train_ds, "src")
            yield from _text_stream(train_ds, "tgt")
        run.own(src_path)
        train_sentencepiece(both(), src_path, **options)
    else:
        run.own(src_path, tgt_path)
        train_sentencepiece(_text_stream(train_ds, "src"), src_path, **options)
        train_sentencepiece(_text_stream(train_ds, "tgt"), tgt_path, **options)
    log(f"trained SentencePiece {tok.type} ({'joint' if tok.joint else 'separate'}, {tok.vocab_size} pieces) "
        f"in {time.time() - t0:.1f}s -> {src_path.name}" + ("" if tok.joint else f", {tgt_path.name}"))
    return Tokenizer(src_path), Tokenizer(tgt_path)


def load_split(cfg: Config, which: str, src_tok: Tokenizer, tgt_tok: Tokenizer, raw=None) -> ParallelData:
    """Read, tokenize and clean one split. Training pairs get the full cleaning; validation pairs only
    lose empty sides and what the model cannot hold."""
    data = cfg.data
    corpus = getattr(data, which)
    raw = raw if raw is not None else load_corpus(corpus, data.src_lang, data.tgt_lang, data.cache_dir)
    ds = tokenize(raw, src_tok, tgt_tok, data.num_proc)
    if which == "train":
        ds, report = clean(ds, data.max_len, data.max_ratio)
    else:
        ds, report = clean(ds, cfg.model.max_positions)
    if report.kept == 0:
        raise TrainingError(f"{corpus.describe()}: no pairs left after cleaning ({report})")
    return ParallelData(ds, report)


def _changed_keys(before: dict, after: dict, prefix: str = "") -> list[str]:
    """``key old -> new`` for every setting that differs (the run directory aside)."""
    changed = []
    for key in sorted(set(before) | set(after)):
        a, b, name = before.get(key), after.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{name}.")
        elif a != b and name != "train.run_dir":
            changed.append(f"{name} {a!r} -> {b!r}")
    return changed


# --------------------------------------------------------------------------------------------------
# The loop


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
    budget = max(max_tokens, int(data.src_len.max()), int(data.tgt_len.max()))  # long pairs: a batch alone
    for indices in data.sampler(budget, shuffle=False):
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
    run directory is locked for the whole of it."""
    log = log or (lambda message: print(message, file=sys.stderr))
    run = Run(cfg.train.run_dir)
    run.open_for_training(resume, in_place=tokenizers_in_place(cfg, run))
    try:
        return _train(cfg, run, resume, log, progress)
    finally:
        run.close()


def _train(cfg: Config, run: Run, resume: bool, log: Callable[[str], None], progress: bool | None) -> TrainResult:
    tc = cfg.train
    resume_state, trained_with = None, None
    if resume:
        last, resume_state = run.resume_state(log)
        saved = checkpoint_config(last, resume_state)
        if saved.model != cfg.model or saved.tokenizer.joint != cfg.tokenizer.joint:
            raise TrainingError(f"{last}: the model or tokenizer settings differ from the checkpoint's; "
                                "resume with the run's own config.yaml")
        check_weights(last, resume_state, saved)
        corpus = resume_state.get("corpus", {}).get("train")  # absent from checkpoints before content keys
        if corpus and cfg.data.train.is_set and not same_content(corpus, cfg.data.train):
            raise TrainingError(f"data.train: {cfg.data.train.describe()} is not the corpus {last} was trained on "
                                "(its content changed); resume needs that corpus, or start a new run")
        changed = _changed_keys(saved.to_dict(), cfg.to_dict())
        if changed:
            log("resuming with changed settings: " + ", ".join(changed))
        missing = [p for p in run.tokenizer_paths(cfg.tokenizer.joint) if not p.exists()]
        given = {"src": cfg.tokenizer.src_model, "tgt": cfg.tokenizer.tgt_model or cfg.tokenizer.src_model}
        trained_with = resume_state.get("tokenizer")  # absent from checkpoints before fingerprints
        if missing and not (cfg.tokenizer.src_model and trained_with and all(
                Tokenizer(given[side]).fingerprint == trained_with[side] for side in ("src", "tgt"))):
            raise TrainingError(f"{missing[0]}: missing; {last} was trained with it (another tokenizer would not "
                                "match the weights)")
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = pick_device(tc.device)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)

    # data and tokenizer
    if not (tc.max_steps or tc.max_epochs or tc.max_time or (tc.patience and cfg.data.valid.is_set)):
        raise ConfigError("training would never stop: set train.max_steps, train.max_epochs, train.max_time "
                          "or train.patience (with data.valid)")
    if not cfg.data.train.is_set:
        raise ConfigError("data.train: no training corpus configured (set data.train.src and data.train.tgt)")
    corpus_key = content_key(cfg.data.train)
    raw_train = load_corpus(cfg.data.train, cfg.data.src_lang, cfg.data.tgt_lang, cfg.data.cache_dir)
    src_tok, tgt_tok = prepare_tokenizers(cfg, run, raw_train, log)
    if trained_with and trained_with != {"src": src_tok.fingerprint, "tgt": tgt_tok.fingerprint}:
        raise TrainingError(f"{last}: trained with another tokenizer than "
                            f"{run.tokenizer_paths(cfg.tokenizer.joint)[0]} (the fingerprints differ)")
    train_data = load_split(cfg, "train", src_tok, tgt_tok, raw=raw_train)
    log(f"train {cfg.data.train.describe()}: {train_data.report}")
    valid_data = None
    if cfg.data.valid.is_set:
        valid_data = load_split(cfg, "valid", src_tok, tgt_tok)
        log(f"valid {cfg.data.valid.describe()}: {valid_data.report}")
    run.save_config(cfg)

    # model and optimizer
    model = Transformer(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, joint=cfg.tokenizer.joint).to(device)
    optimizer_cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(model.parameters(), lr=tc.lr, betas=tc.betas, eps=tc.adam_eps,
                              weight_decay=tc.weight_decay)
    sampler = train_data.sampler(tc.max_tokens, shuffle=True, seed=tc.seed)
    higher_is_better = tc.best_metric == "bleu"
    budget = parse_duration(tc.max_time, "train.max_time")
    elapsed_before, loop_start = 0.0, time.time()

    def elapsed() -> float:
        """Training seconds so far, across resumes (data preparation excluded)."""
        return elapsed_before + time.time() - loop_start

    step, best, bad_validations = 0, (-math.inf if higher_is_better else math.inf), 0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        try:
            sampler.load_state_dict(resume_state["sampler"])
        except ValueError as e:
            raise TrainingError(f"{last}: {e}") from None
        trainer = resume_state["trainer"]
        if trainer.get("version") != TRAINER_STATE_VERSION:
            raise TrainingError(f"{last}: trainer state version {trainer.get('version')} "
                                f"is not {TRAINER_STATE_VERSION}")
        if trainer["best_metric"] != tc.best_metric:
            raise TrainingError(f"{last}: the run picked best.pt by {trainer['best_metric']}, "
                                f"not train.best_metric={tc.best_metric}")
        step, best, bad_validations = trainer["step"], trainer["best"], trainer["bad_validations"]
        elapsed_before = trainer["elapsed"]
        ckpt.set_rng_state(resume_state["rng"])
        log(f"resumed from {last} at step {step} (epoch {sampler.epoch + 1}, "
            f"batch {sampler.position}/{len(sampler)})")
    else:
        log(f"model: {model.num_parameters():,} parameters, {cfg.model.encoder_layers}+{cfg.model.decoder_layers} "
            f"layers, d_model {cfg.model.d_model}; device {device}, {tc.precision}")
    bf16_warning = slow_bf16_warning(device) if tc.precision == "bf16" else ""
    if bf16_warning:
        log(f"warning: {bf16_warning} (train.precision=fp32)")
    run.disk_check(model)
    metrics = run.metrics()
    if resume_state is not None:
        metrics.truncate_after(step)
    saved_step = step if resume_state is not None else -1  # a resumed run's state is already saved

    def save(tag: str, valid: dict | None) -> None:
        nonlocal saved_step
        saved_step = step
        state = {
            "format": "mt", "version": ckpt.FORMAT_VERSION,
            "model": model.state_dict(), "config": cfg.to_dict(),
            "vocab": {"src": src_tok.vocab_size, "tgt": tgt_tok.vocab_size},
            "tokenizer": {"src": src_tok.fingerprint, "tgt": tgt_tok.fingerprint}, "corpus": {"train": corpus_key},
            "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
            "trainer": {"version": TRAINER_STATE_VERSION, "step": step, "best_metric": tc.best_metric,
                        "best": best, "bad_validations": bad_validations, "elapsed": elapsed(),
                        "window": [window_tokens, window_loss, window_nll]},
            "rng": ckpt.rng_state(), "valid": valid or {},
        }
        run.save_checkpoint(state, step, best=tag == "best", keep=tc.keep_checkpoints)

    def batch_stream() -> Iterator[np.ndarray]:
        """Batches across epochs; ``sampler`` holds the position, so this resumes mid-epoch."""
        while not tc.max_epochs or sampler.epoch < tc.max_epochs:
            yield from sampler
            sampler.set_epoch(sampler.epoch + 1)

    def run_validation() -> tuple[dict | None, bool]:
        """Validate, log, and say whether this is the best model so far."""
        nonlocal best, bad_validations
        if valid_data is None:
            return None, False
        result = validate(model, valid_data, max_tokens=tc.max_tokens, epsilon=tc.label_smoothing,
                          device=device, precision=tc.precision)
        if tc.valid_beam:
            result["bleu"] = validation_bleu(model, valid_data.ds["src"], valid_data.ds["tgt"], src_tok, tgt_tok,
                                             replace(cfg.decode, beam=tc.valid_beam))
        value = result[tc.best_metric]
        improved = value > best if higher_is_better else value < best
        if improved:
            best, bad_validations = value, 0
        else:
            bad_validations += 1
        metrics.write(kind="valid", step=step, epoch=sampler.epoch + 1, **result, best=improved)
        log(f"step {step}: valid loss {result['loss']:.4f} nll {result['nll']:.4f} ppl {result['ppl']:.2f}"
            + (f" bleu {result['bleu']:.2f}" if "bleu" in result else "")
            + (" (best)" if improved else f" (no improvement for {bad_validations})"))
        return result, improved

    model.train()
    initial_step = step
    loop_start = time.time()  # the time budget counts training, not data preparation
    stream = batch_stream()
    bar = tqdm(total=tc.max_steps or None, initial=step, disable=progress is False if progress is not None else None,
               file=sys.stderr, dynamic_ncols=True, unit="step")
    # the logging window (rows average log_every updates) is part of the state, so resumed rows match
    window_tokens, window_loss, window_nll = resume_state["trainer"]["window"] if resume_state else (0, 0.0, 0.0)
    window_start = time.time()
    bad_updates, stopped = 0, ""
    with StopSignals() as signals:
        while not stopped:
            if signals.received:
                stopped = f"interrupted by {signal.Signals(signals.received).name}"
                break
            if budget and elapsed() >= budget:
                stopped = f"reached train.max_time={tc.max_time}"
                break
            if tc.max_steps and step >= tc.max_steps:
                stopped = f"reached train.max_steps={tc.max_steps}"
                break
            if tc.patience and bad_validations >= tc.patience:  # here too: a resumed early-stopped run
                stopped = f"early stopping: no improvement in {tc.patience} validations"
                break
            group = [train_data.batch(i) for _, i in zip(range(tc.accum_steps), stream)]
            if not group:
                stopped = f"reached train.max_epochs={tc.max_epochs}"
                break
            step += 1
            # lr for this update, then forward/backward over the accumulated batches
            lr = learning_rate(step, tc, budget_used=max(step / tc.max_steps if tc.max_steps else 0.0,
                                                         elapsed() / budget if budget else 0.0))
            for group_ in optimizer.param_groups:
                group_["lr"] = lr
            tokens = sum(b.num_tgt_tokens for b in group)
            loss_total = nll_total = 0.0
            for batch in group:
                batch = batch.to(device)
                with autocast(device, tc.precision):
                    loss, nll = batch_loss(model, batch, tc.label_smoothing)
                # normalise by the update's token count so accumulation equals one big batch
                (loss / tokens).backward()
                loss_total, nll_total = loss_total + loss.item(), nll_total + nll.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm or float("inf"))
            if not (math.isfinite(loss_total) and torch.isfinite(grad_norm)):
                # skip the update rather than poison the weights; give up if it keeps happening
                optimizer.zero_grad(set_to_none=True)
                bad_updates += 1
                log(f"step {step}: non-finite loss or gradient, update skipped ({bad_updates} in a row)")
                if bad_updates >= MAX_BAD_UPDATES:
                    raise TrainingError(f"{bad_updates} non-finite updates in a row at step {step}; lower "
                                        "train.lr, raise train.warmup_steps or use train.precision=fp32")
                continue
            bad_updates = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            window_tokens += tokens
            window_loss += loss_total
            window_nll += nll_total
            bar.update(1)
            if step % tc.log_every == 0 or step == 1:
                window_seconds = max(time.time() - window_start, 1e-9)
                row = {"loss": window_loss / window_tokens, "nll": window_nll / window_tokens, "lr": lr,
                       "tokens_per_s": window_tokens / window_seconds, "grad_norm": float(grad_norm)}
                metrics.write(kind="train", step=step, epoch=sampler.epoch + 1, **row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                window_tokens, window_start, window_loss, window_nll = 0, time.time(), 0.0, 0.0
            if step % tc.valid_every == 0:
                valid, improved = run_validation()
                save("best" if improved or valid_data is None else "step", valid)
            elif tc.save_every and step % tc.save_every == 0:
                save("step", None)
    bar.close()
    if signals.received:  # save at once; validating could take long
        if saved_step != step:
            save("step", None)
    elif saved_step != step:  # the final state, validated and saved
        valid, improved = run_validation()
        save("best" if improved or valid_data is None else "step", valid)
    log(f"stopped at step {step}: {stopped}" + ("; checkpoint saved, continue with --resume" if signals.received else ""))
    metrics.write(kind="end", step=step, epoch=sampler.epoch + 1, reason=stopped,
                  **{f"best_{tc.best_metric}": best})
    if step != initial_step:  # the model changed: an earlier choice no longer holds
        run.drop_tuning()
    wants_tuning = tc.average_last >= 2 or cfg.decode.tune_beam or cfg.decode.tune_lenpen
    if valid_data is not None and wants_tuning and not run.has_defaults() and not signals.received:
        tune.choose_defaults(cfg, run, valid_data.ds["src"], valid_data.ds["tgt"], str(device), log)
    return TrainResult(step=step, epoch=sampler.epoch + 1, best=best, stopped=stopped, run_dir=run.path,
                       signal=signals.received)
