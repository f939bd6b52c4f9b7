"""Batches made ahead by a background thread (mt/prefetch.py): the same training, the same resume."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from mt import checkpoint as ckpt
from mt.batch import collate
from mt.config import load_config
from mt.prefetch import Prefetcher
from mt.train import train


def fake_batch(indices: np.ndarray):
    return collate([[5, 6]] * len(indices), [[7]] * len(indices), indices)


def updates(n: int) -> list[list[np.ndarray]]:
    return [[np.array([2 * u]), np.array([2 * u + 1])] for u in range(n)]


def test_the_thread_gives_each_update_in_order_and_checks_it_is_the_one_asked_for():
    made = []

    def make(indices):
        made.append(int(indices[0]))
        return fake_batch(indices)

    with Prefetcher(iter(updates(5)), make, depth=2) as ahead:
        for u, indices in enumerate(updates(4)):
            got = ahead.get(indices)
            assert [b.indices.tolist() for b in got] == [[2 * u], [2 * u + 1]]
        with pytest.raises(RuntimeError, match="not the update's"):
            ahead.get([np.array([99]), np.array([100])])
    assert made == list(range(10))  # made once each, in order, and no further than the data


def test_an_error_in_the_thread_reaches_the_loop_and_closing_never_hangs():
    def broken(indices):
        if indices[0] == 4:
            raise OSError("the disk went away")
        return fake_batch(indices)

    ahead = Prefetcher(iter(updates(6)), broken, depth=1)
    ahead.get(updates(1)[0])
    ahead.get(updates(2)[1])
    with pytest.raises(OSError, match="the disk went away"):
        ahead.get(updates(3)[2])
    ahead.close()

    endless = (u for _ in iter(int, 1) for u in updates(3))  # a thread blocked on a full queue
    full = Prefetcher(endless, fake_batch, depth=1)
    full.close()
    assert not [t for t in threading.enumerate() if t.name == "mt-prefetch"]


def test_without_depth_batches_are_made_when_asked_for():
    seen = []
    with Prefetcher(iter(()), lambda i: seen.append(int(i[0])) or fake_batch(i), depth=0) as now:
        now.get([np.array([3])])
        assert seen == [3]
        assert not [t for t in threading.enumerate() if t.name == "mt-prefetch"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, multi30k_head) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("prefetch")
    out = {}
    for split, n in (("train", 200), ("val", 40)):
        for lang in ("de", "en"):
            out[split, lang] = d / f"{split}.{lang}"
            out[split, lang].write_text("\n".join(multi30k_head(split, lang, n)) + "\n", encoding="utf-8")
    return out


def config(files, run_dir: Path, cache_dir: str, spm_model: Path, **train_keys):
    values = {
        "data.train.src": files["train", "de"], "data.train.tgt": files["train", "en"],
        "data.valid.src": files["val", "de"], "data.valid.tgt": files["val", "en"],
        "data.cache_dir": cache_dir, "data.max_len": 64, "tokenizer.src_model": spm_model,
        "model.d_model": 32, "model.n_heads": 2, "model.ffn_dim": 64, "model.encoder_layers": 1,
        "model.decoder_layers": 1, "model.dropout": 0.1, "model.max_positions": 128,
        "train.run_dir": run_dir, "train.max_tokens": 512, "train.max_steps": 30, "train.valid_every": 1000,
        "train.save_every": 5, "train.log_every": 1, "train.lr": 0.003, "train.warmup_steps": 4,
        "train.device": "cpu", "train.num_threads": 1, **{f"train.{k}": v for k, v in train_keys.items()},
    }
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_training_with_the_thread_is_training_without_it_and_resumes_the_same(tmp_path, cache_dir, files, spm_model):
    # 30 updates of 512-token batches cross epoch boundaries of the 200-pair corpus; step 13 is mid-epoch
    ahead, plain, resumed = tmp_path / "ahead", tmp_path / "plain", tmp_path / "resumed"
    train(config(files, ahead, cache_dir, spm_model, prefetch=2), log=lambda m: None, progress=False)
    train(config(files, plain, cache_dir, spm_model, prefetch=0), log=lambda m: None, progress=False)
    train(config(files, resumed, cache_dir, spm_model, prefetch=2, max_steps=13), log=lambda m: None, progress=False)
    train(config(files, resumed, cache_dir, spm_model, prefetch=2), resume=True, log=lambda m: None, progress=False)

    a, b, c = (ckpt.load(d / "checkpoints" / "last.pt") for d in (ahead, plain, resumed))
    assert a["trainer"]["epoch"] >= 1 and a["trainer"]["step"] == b["trainer"]["step"] == c["trainer"]["step"] == 30
    assert a["sampler"] == b["sampler"] == c["sampler"]
    position = ("step", "epoch", "batch", "window_tokens", "window_loss", "window_nll")  # (c validated at 13)
    for other in (b, c):
        assert [a["trainer"][k] for k in position] == [other["trainer"][k] for k in position]
        assert all(torch.equal(a["model"][k], other["model"][k]) for k in a["model"])
    assert losses(ahead) == losses(plain)
    assert losses(resumed) == pytest.approx(losses(ahead), abs=1e-6)
    assert not [t for t in threading.enumerate() if t.name == "mt-prefetch"]  # every run stopped its thread
