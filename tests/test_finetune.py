"""Fine-tuning (train.init_from): the parent's weights and tokenizer, a fresh optimizer and step (or
the parent's optimizer on purpose), and refusals of another tokenizer or model shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mt import checkpoint as ckpt
from mt import finetune
from mt.config import ConfigError, config_from_dict
from mt.model import Transformer
from mt.tokenizer import train_sentencepiece
from mt.train import train


def write(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def config(tmp: Path, name: str, train_pairs: tuple[str, str], **train_keys) -> dict:
    return {
        "data": {"train": {"src": train_pairs[0], "tgt": train_pairs[1]},
                 "valid": {"src": str(tmp / "valid.de"), "tgt": str(tmp / "valid.en")},
                 "max_len": 64, "cache_dir": str(tmp / "cache")},
        "tokenizer": {"vocab_size": 400},
        "model": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1,
                  "dropout": 0.0, "max_positions": 128},
        "train": {"run_dir": str(tmp / name), "max_tokens": 1024, "lr": 3e-3, "warmup_steps": 5,
                  "log_every": 1, "num_threads": 1, **train_keys},
    }


def rows(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, multi30k_head):
    """A parent trained on 1,500 Multi30k pairs; the child's task: 500 other pairs."""
    tmp = tmp_path_factory.mktemp("finetune")
    de, en = multi30k_head("train", "de", 2000), multi30k_head("train", "en", 2000)
    parent_data = (write(tmp / "parent.de", de[:1500]), write(tmp / "parent.en", en[:1500]))
    child_data = (write(tmp / "child.de", de[1500:]), write(tmp / "child.en", en[1500:]))
    write(tmp / "valid.de", de[1900:])
    write(tmp / "valid.en", en[1900:])
    train(config_from_dict(config(tmp, "parent", parent_data, max_steps=60, valid_every=60)), log=lambda _: None,
          progress=False)
    return tmp, child_data


def test_fine_tuning_starts_from_the_parent_and_lowers_the_loss_on_the_new_task(setup):
    tmp, child_data = setup
    parent = tmp / "parent"
    messages: list[str] = []
    train(config_from_dict(config(tmp, "child", child_data, max_steps=20, valid_every=10,
                                  init_from=str(parent))), log=messages.append, progress=False)
    scratch_cfg = config(tmp, "scratch", child_data, max_steps=1, valid_every=1)
    train(config_from_dict(scratch_cfg), log=lambda _: None, progress=False)
    child, scratch = tmp / "child", tmp / "scratch"
    assert (child / "spm.model").read_bytes() == (parent / "spm.model").read_bytes()  # its tokenizer reused
    assert any(m.startswith(f"initialised from {parent / 'checkpoints' / 'best.pt'}") for m in messages)
    first = rows(child, "train")[0]
    assert first["step"] == 1 and first["lr"] < 3e-3 / 4  # a fresh schedule: warmup from step 1
    assert first["loss"] < 0.8 * rows(scratch, "train")[0]["loss"]  # the parent's weights, not random ones
    valid = rows(child, "valid")
    assert valid[-1]["loss"] < valid[0]["loss"] < rows(parent, "valid")[-1]["loss"] + 1.0
    state = ckpt.load(child / "checkpoints" / "last.pt")
    assert state["trainer"]["step"] == 20
    assert max(s["step"] for s in state["optimizer"]["state"].values()) == 20  # a fresh optimizer
    assert state["optimizer"]["param_groups"][0]["fused"] is True  # PyTorch's fused AdamW kernel on CPU


def test_init_keep_optimizer_continues_the_parents_moments(setup):
    tmp, child_data = setup
    parent_path = tmp / "parent" / "checkpoints" / "last.pt"
    train(config_from_dict(config(tmp, "child_keep", child_data, max_steps=5, valid_every=5,
                                  init_from=str(parent_path), init_keep_optimizer=True, betas=[0.8, 0.95],
                                  weight_decay=0.01)), log=lambda _: None, progress=False)
    state = ckpt.load(tmp / "child_keep" / "checkpoints" / "last.pt")
    assert max(s["step"] for s in state["optimizer"]["state"].values()) == 60 + 5
    group = state["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.8, 0.95) and group["weight_decay"] == 0.01  # this run's settings
    assert group["fused"] is True

    # what is loaded: the parent's moments themselves, under this run's settings
    parent = finetune.find_parent(str(parent_path))
    model = Transformer(parent.config.model, 400, 400)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.8, 0.95), weight_decay=0.01)
    finetune.load_into(parent, model, optimizer)
    saved = parent.state["optimizer"]["state"]
    for n, p in enumerate(model.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg"], saved[n]["exp_avg"])
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95) and optimizer.param_groups[0]["lr"] == 1e-4
    assert optimizer.param_groups[0]["fused"] is None  # this optimizer's kernel, not the parent's (fused)
    assert torch.equal(model.state_dict()["tgt_embed.weight"], parent.state["model"]["tgt_embed.weight"])


def test_another_tokenizer_or_model_shape_is_refused(setup, multi30k_head):
    tmp, child_data = setup
    other = train_sentencepiece(multi30k_head("train", "de", 500), tmp / "other.model", vocab_size=400, num_threads=1)
    cases = [({"tokenizer": {"src_model": str(other)}}, "tokenizer.src_model: "),
             ({"tokenizer": {"vocab_size": 500}}, "tokenizer.vocab_size=500"),
             ({"model": {"ffn_dim": 128}}, "model.ffn_dim=128 (parent: 64)"),
             ({"train": {"regimes": [{"min_epochs": 9, "set": ["model.dropout=0.1"]},  # a regime's shape too
                                     {"min_epochs": 5, "set": ["model.ffn_dim=128"]}]}},
              "train.regimes.1: train.init_from: the model differs from .*: model.ffn_dim=128 (parent: 64)")]
    for n, (change, message) in enumerate(cases):
        cfg = config(tmp, f"refused{n}", child_data, max_steps=5, init_from=str(tmp / "parent"))
        for section, values in change.items():
            cfg[section] = {**cfg[section], **values}
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            train(config_from_dict(cfg), log=lambda _: None, progress=False)
        assert not (tmp / f"refused{n}" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="no such run directory or checkpoint"):
        train(config_from_dict(config(tmp, "refused_missing", child_data, max_steps=5, init_from=str(tmp / "nope"))),
              log=lambda _: None, progress=False)
    with_dropout = config(tmp, "dropout_ok", child_data, max_steps=2, init_from=str(tmp / "parent"))
    with_dropout["model"]["dropout"] = 0.3  # not a shape: allowed
    train(config_from_dict(with_dropout), log=lambda _: None, progress=False)
    assert ckpt.load(tmp / "dropout_ok" / "checkpoints" / "last.pt")["config"]["model"]["dropout"] == 0.3
