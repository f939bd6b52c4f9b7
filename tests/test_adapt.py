"""Regimes chosen from the measured speed (train.regimes, mt/adapt.py): the choice, the probe, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mt import checkpoint as ckpt
from mt.adapt import choose
from mt.config import ConfigError, load_config
from mt.info import describe, format_info
from mt.train import train

REGIMES = "[{min_epochs: 1, set: [model.dropout=0.2, train.max_tokens=512]}, {min_epochs: 1000, set: [model.dropout=0.3]}]"


@pytest.fixture(scope="module")
def files(tmp_path_factory, multi30k_head) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("adapt")
    out = {}
    for split, source, n in (("train", "train", 200), ("val", "val", 60)):
        for lang in ("de", "en"):
            out[f"{split}.{lang}"] = d / f"{split}.{lang}"
            out[f"{split}.{lang}"].write_text("\n".join(multi30k_head(source, lang, n)) + "\n", encoding="utf-8")
    return out


def overrides(files: dict[str, Path], run_dir: Path, cache_dir: str, spm_model: Path, **extra) -> list[str]:
    values = {
        "data.train.src": files["train.de"], "data.train.tgt": files["train.en"],
        "data.valid.src": files["val.de"], "data.valid.tgt": files["val.en"],
        "data.cache_dir": cache_dir, "data.max_len": 64, "tokenizer.src_model": spm_model,
        "model.d_model": 32, "model.n_heads": 2, "model.ffn_dim": 64,
        "model.encoder_layers": 1, "model.decoder_layers": 1, "model.dropout": 0.0, "model.max_positions": 128,
        "train.run_dir": run_dir, "train.max_tokens": 1024, "train.max_steps": 12, "train.valid_every": 1000,
        "train.log_every": 1, "train.lr": 0.003, "train.warmup_steps": 4, "train.device": "cpu",
        "train.num_threads": 1, "train.probe_steps": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_the_regime_with_the_largest_min_epochs_within_the_budget_is_chosen():
    cfg = load_config(None, ["train.max_steps=10",
                             "train.regimes=[{min_epochs: 30, set: [model.dropout=0.3]}, {min_epochs: 10}, "
                             "{min_epochs: 20, set: [train.max_tokens=8192]}]"])
    assert [choose(cfg, e) for e in (0.0, 9.99, 10.0, 19.9, 20.0, 29.9, 30.0, 1e9)] == [-1, -1, 1, 1, 2, 2, 0, 0]
    chosen = cfg.with_settings(cfg.train.regimes[2].set)
    assert chosen.train.max_tokens == 8192 and chosen.train.regimes == [] and chosen.model == cfg.model


@pytest.mark.parametrize("regimes, message", [
    ("[{min_epochs: 5, set: [model.dropuot=0.3]}]", "train.regimes.0: unknown key 'model.dropuot'"),
    ("[{min_epochs: 5, set: [model.dropout=1.5]}]", r"train.regimes.0: model.dropout: must be in \[0, 1\)"),
    ("[{min_epochs: 5}, {min_epochs: 5, set: [train.max_time=2h]}]", "train.regimes.1.set: 'train.max_time=2h'"),
    ("[{min_epochs: 5, set: [data.max_len=64]}]", "train.regimes.0.set: 'data.max_len=64' is not a model.KEY"),
    ("[{min_epochs: 5, set: [data.sampling_nbest=1]}]", "train.regimes.0: data.sampling_nbest: 1: sampling needs at least 2"),
    ("[{min_epochs: -1}]", "train.regimes.0.min_epochs: must be >= 0"),
    ("[{min_epochs: 5, set: [train.max_tokens=32]}]", r"data.max_len \(128\) exceeds train.max_tokens \(32\)"),
    ("[{min_epochs: 5, set: [model.dropout]}]", "train.regimes.0.set: 'model.dropout' is not a KEY=VALUE setting"),
    ("[{min_epochs: 5, set: [train.seed=3]}]", r"train.regimes.0.set: 'train.seed=3': the choice is made by, or after"),
    ("[{min_epochs: 5}, {min_epochs: 5.0, set: [model.dropout=0.2]}]", "two regimes have the same min_epochs"),
])
def test_a_bad_regime_is_refused_when_the_config_loads(regimes, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["train.max_steps=10", f"train.regimes={regimes}"])


def test_the_budget_in_epochs_follows_the_measured_pace_and_the_caps(monkeypatch):
    import mt.adapt as adapt
    from mt.distributed import Dist

    monkeypatch.setattr(adapt, "time_updates", lambda cfg, data, device, d: (0.1, 5.0))  # 10 updates/s, 5 s probe
    monkeypatch.setattr(adapt, "updates_per_epoch", lambda cfg, data, d: 50.0)

    def epochs(*settings: str) -> float:
        return adapt.afforded(load_config(None, list(settings)), None, torch.device("cpu"), Dist()).epochs

    assert epochs("train.max_time=105s") == pytest.approx(20.0)  # (105 - 5) s x 10 updates/s / 50 a epoch
    assert epochs("train.max_time=105s", "train.max_steps=500") == pytest.approx(10.0)
    assert epochs("train.max_time=105s", "train.max_epochs=3") == pytest.approx(3.0)
    assert epochs("train.max_time=3s") == 0.0  # the probe took the whole budget
    budget = adapt.afforded(load_config(None, ["train.max_steps=200"]), None, torch.device("cpu"), Dist())
    assert (budget.epochs, budget.seconds_per_update, budget.probe_seconds) == (4.0, 0.0, 0.0)  # no time: no probe


def test_regimes_need_a_budget():
    with pytest.raises(ConfigError, match="train.regimes: are chosen by the budget"):
        load_config(None, ["train.regimes=[{min_epochs: 5}]"])


def test_a_probed_run_trains_exactly_like_one_given_the_chosen_settings_and_resumes_with_them(
        tmp_path, cache_dir, files, spm_model):
    # max_time starts the probe; max_steps caps the budget, so the epochs (and so the choice) are known:
    # 12 updates over an epoch of a few 1024-token batches is more than 1 epoch, far less than 1000
    adapted_dir, direct_dir = tmp_path / "adapted", tmp_path / "direct"
    messages: list[str] = []
    train(load_config(None, overrides(files, adapted_dir, cache_dir, spm_model, **{
        "train.max_time": "1h", "train.regimes": REGIMES})), log=messages.append, progress=False)
    train(load_config(None, overrides(files, direct_dir, cache_dir, spm_model, **{
        "train.max_time": "1h", "model.dropout": 0.2, "train.max_tokens": 512})), log=lambda m: None, progress=False)

    said = [m for m in messages if m.startswith("regime")]
    assert len(said) == 1 and said[0].startswith("regime 1 of 2 (min_epochs 1): model.dropout=0.2, train.max_tokens=512")
    written = load_config(adapted_dir / "config.yaml")
    assert (written.model.dropout, written.train.max_tokens, written.train.regimes) == (0.2, 512, [])
    probe = [r for r in rows(adapted_dir) if r["kind"] == "regime"]
    assert len(probe) == 1 and probe[0]["regime"] == 0 and probe[0]["step"] == 0
    assert probe[0]["seconds_per_update"] > 0 and probe[0]["probe_seconds"] > 0
    assert 1 <= probe[0]["epochs"] == pytest.approx(12 / probe[0]["updates_per_epoch"])

    info = describe(adapted_dir)  # mt info says what the run chose, and from what
    assert info["regime"] == {"index": 0, "set": ["model.dropout=0.2", "train.max_tokens=512"],
                              "epochs": probe[0]["epochs"], "seconds_per_update": probe[0]["seconds_per_update"],
                              "updates_per_epoch": probe[0]["updates_per_epoch"]}
    assert re.search(r"^regime +1: model.dropout=0.2, train.max_tokens=512 \(0\.\d+ s per update in the probe, "
                     r"\d+\.\d epochs in the budget\)$", format_info(info), re.M)
    assert "regime" not in describe(direct_dir)

    a, b = (ckpt.load(d / "checkpoints" / "last.pt") for d in (adapted_dir, direct_dir))
    assert a["trainer"]["step"] == b["trainer"]["step"] == 12
    # the probe leaves no trace but its time: the same weights as the run given those settings directly
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert probe[0]["elapsed"] == pytest.approx(probe[0]["probe_seconds"], abs=1e-3)  # the clock starts there
    assert a["regime"] == {"index": 0, "set": ["model.dropout=0.2", "train.max_tokens=512"]}

    # resumed with the recipe itself (regimes and the base settings): the run's choice holds, no new probe
    resumed: list[str] = []
    train(load_config(None, overrides(files, adapted_dir, cache_dir, spm_model, **{
        "train.max_time": "1h", "train.regimes": REGIMES, "train.max_steps": 14})),
        resume=True, log=resumed.append, progress=False)
    assert not [m for m in resumed if m.startswith(("regime", "timing"))]
    assert "the run's regime holds: model.dropout=0.2 (this config: 0.0), train.max_tokens=512 (this config: 1024)" \
        in resumed
    assert [m for m in resumed if "changed settings" in m] == ["resuming with changed settings: train.max_steps 12 -> 14"]
    assert load_config(adapted_dir / "config.yaml").model.dropout == 0.2
    assert ckpt.load(adapted_dir / "checkpoints" / "last.pt")["trainer"]["step"] == 14
    assert len([r for r in rows(adapted_dir) if r["kind"] == "regime"]) == 1

    # resumed with other regimes: what the run applied still holds (its checkpoints record it), and the
    # keys the new regimes name keep the run's values too
    again: list[str] = []
    train(load_config(None, overrides(files, adapted_dir, cache_dir, spm_model, **{
        "train.max_time": "1h", "train.regimes": "[{min_epochs: 0, set: [train.lr=0.5]}]", "train.max_steps": 15})),
        resume=True, log=again.append, progress=False)
    assert "the run's regime holds: model.dropout=0.2 (this config: 0.0), train.max_tokens=512 (this config: 1024)" \
        in again
    last = ckpt.load(adapted_dir / "checkpoints" / "last.pt")
    assert last["trainer"]["step"] == 15 and last["config"]["train"]["lr"] == 0.003 and last["regime"]["index"] == 0


def test_a_regime_may_turn_on_subword_regularisation_and_a_resumed_run_keeps_it(tmp_path, cache_dir, files, spm_model):
    # the corpus is prepared before the choice; sampling acts batch by batch, so a regime may set it
    adapted_dir, direct_dir = tmp_path / "adapted", tmp_path / "direct"
    messages: list[str] = []
    train(load_config(None, overrides(files, adapted_dir, cache_dir, spm_model, **{
        "train.max_time": "1h", "train.regimes": "[{min_epochs: 1, set: [data.sampling_alpha=0.2, data.sampling_nbest=4]}]"})),
        log=messages.append, progress=False)
    train(load_config(None, overrides(files, direct_dir, cache_dir, spm_model, **{
        "train.max_time": "1h", "data.sampling_alpha": 0.2, "data.sampling_nbest": 4})), log=lambda m: None, progress=False)
    sampled = [m for m in messages if "subword regularisation" in m]
    assert sampled == ["train: subword regularisation: each batch segmented anew by sampling (alpha 0.2, nbest 4)"]
    assert messages.index(sampled[0]) > messages.index(next(m for m in messages if m.startswith("regime 1 of 1")))
    assert load_config(adapted_dir / "config.yaml").data.sampling_alpha == 0.2
    a, b = (ckpt.load(d / "checkpoints" / "last.pt") for d in (adapted_dir, direct_dir))
    assert a["trainer"]["step"] == b["trainer"]["step"] == 12
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])  # the same sampled batches

    # without sampling the weights differ: the check above can fail
    plain_dir = tmp_path / "plain"
    train(load_config(None, overrides(files, plain_dir, cache_dir, spm_model, **{"train.max_time": "1h"})),
          log=lambda m: None, progress=False)
    c = ckpt.load(plain_dir / "checkpoints" / "last.pt")
    assert not all(torch.equal(c["model"][k], b["model"][k]) for k in b["model"])

    resumed: list[str] = []
    train(load_config(None, overrides(files, adapted_dir, cache_dir, spm_model, **{
        "train.max_time": "1h", "train.regimes": "[{min_epochs: 1, set: [data.sampling_alpha=0.2, data.sampling_nbest=4]}]",
        "train.max_steps": 14})), resume=True, log=resumed.append, progress=False)
    assert "the run's regime holds: data.sampling_alpha=0.2 (this config: 0.0), data.sampling_nbest=4 (this config: 8)" \
        in resumed
    assert "train: subword regularisation: each batch segmented anew by sampling (alpha 0.2, nbest 4)" in resumed


def test_a_slow_machine_keeps_the_base_settings(tmp_path, cache_dir, files, spm_model):
    # without max_time there is nothing to time: 12 updates are fewer than 1000 epochs, more than 0.01
    run_dir = tmp_path / "run"
    messages: list[str] = []
    train(load_config(None, overrides(files, run_dir, cache_dir, spm_model, **{
        "train.regimes": "[{min_epochs: 1000, set: [model.dropout=0.3]}]"})), log=messages.append, progress=False)
    said = [m for m in messages if m.startswith("regime")]
    assert len(said) == 1 and said[0].startswith("regime: the base settings (")
    assert "regimes start at 1000" in said[0] and "s per update" not in said[0]
    written = load_config(run_dir / "config.yaml")
    assert (written.model.dropout, written.train.max_tokens, written.train.regimes) == (0.0, 1024, [])
    probe = [r for r in rows(run_dir) if r["kind"] == "regime"]
    assert probe[0]["regime"] == -1 and probe[0]["probe_seconds"] == 0
