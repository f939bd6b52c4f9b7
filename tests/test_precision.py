"""The precision policy (train.precision: auto): bf16 where the hardware has it natively, fp16 on GPUs
before Ampere, fp32 elsewhere; chosen once, logged, written into the run's config, kept on resume."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from mt.config import config_from_dict
from mt.device import choose_dtype, choose_precision
from mt.train import train


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
    return path


def test_auto_picks_bf16_only_where_it_is_native(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    assert choose_precision("auto", cpu, cpuinfo(tmp_path, "avx512_bf16")) == ("fp32", "auto: MT_AUTO_FP32=1")
    assert choose_dtype("auto", cpu, cpuinfo(tmp_path, "avx512_bf16")) == ("fp32", "auto: MT_AUTO_FP32=1")
    monkeypatch.delenv("MT_AUTO_FP32")  # the tests' pin: what auto means on a machine
    assert choose_precision("auto", cpu, cpuinfo(tmp_path, "avx2 avx512f avx512_bf16")) == \
        ("bf16", "auto: this CPU has native bf16 (avx512_bf16)")
    assert choose_precision("auto", cpu, cpuinfo(tmp_path, "avx2 amx_bf16 amx_tile"))[0] == "bf16"
    assert choose_precision("auto", cpu, cpuinfo(tmp_path, "avx2 fma")) == ("fp32", "auto: this CPU has no native bf16")
    assert choose_precision("auto", cpu, tmp_path / "missing")[0] == "fp32"
    assert choose_precision("fp16", cpu, cpuinfo(tmp_path, "avx512_bf16")) == ("fp16", "train.precision")  # asked
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "a GPU")
    for capability, want in (((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d, c=capability: c)
        assert choose_precision("auto", torch.device("cuda"))[0] == want
        assert choose_dtype("auto", torch.device("cuda"))[0] == ("fp32" if want == "fp16" else "bf16")


def test_decoding_auto_takes_the_fastest_mode_measured_on_each_kind_of_cpu(tmp_path, monkeypatch):
    monkeypatch.delenv("MT_AUTO_FP32")
    cpu = torch.device("cpu")
    assert choose_dtype("auto", cpu, cpuinfo(tmp_path, "avx2 avx512_bf16 amx_bf16"))[0] == "bf16"
    assert choose_dtype("auto", cpu, cpuinfo(tmp_path, "avx2 avx512_vnni avx512_bf16")) == (
        "bf16", "auto: this CPU has native bf16 (avx512_bf16)")
    assert choose_dtype("auto", cpu, cpuinfo(tmp_path, "avx2 fma")) == ("int8", "auto: int8 kernels (no native bf16 on this CPU)")
    assert choose_dtype("auto", cpu, cpuinfo(tmp_path, "avx2"), int8_missing="no FBGEMM")[0] == "fp32"
    assert choose_dtype("auto", cpu, cpuinfo(tmp_path, "bf16 asimd"), int8_missing="no FBGEMM")[0] == "bf16"  # ARM
    assert choose_dtype("int8", cpu, cpuinfo(tmp_path, "avx512_bf16")) == ("int8", "decode.dtype")  # asked


def test_auto_is_resolved_into_the_run_and_kept_on_resume(tmp_path, small_corpus, monkeypatch):
    raw = {"data": small_corpus(tmp_path, 300, 20),
           "tokenizer": {"vocab_size": 300},
           "model": {"d_model": 16, "n_heads": 2, "ffn_dim": 32, "encoder_layers": 1, "decoder_layers": 1,
                     "dropout": 0.0},
           "train": {"run_dir": str(tmp_path / "run"), "max_steps": 2, "valid_every": 2, "warmup_steps": 1,
                     "num_threads": 1, "precision": "auto"}}
    monkeypatch.delenv("MT_AUTO_FP32")  # what auto means on this machine
    expected, why = choose_precision("auto", torch.device("cpu"))
    messages: list[str] = []
    train(config_from_dict(raw), log=messages.append, progress=False)
    assert f"precision: {expected} ({why})" in messages
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["train"]["precision"] == expected  # the choice, not "auto"

    other = "fp32" if expected == "bf16" else "bf16"  # a machine that would choose otherwise
    monkeypatch.setattr("mt.train.choose_precision", lambda requested, device: (other, "auto: elsewhere"))
    messages.clear()
    raw["train"]["max_steps"] = 4
    train(config_from_dict(raw), resume=True, log=messages.append, progress=False)
    assert f"precision: {expected} (as the run started)" in messages
    assert not any("changed settings" in m and "precision" in m for m in messages)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["precision"] == expected


def test_a_resumed_optimizer_takes_this_processes_kernel():
    """A checkpoint's optimizer state from an unfused AdamW (before fused_adam) resumes into the fused
    one as fused, with its moments; PyTorch's own load would take the saved group's kernel too."""
    from mt.device import with_settings_of

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    old = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    old.step()
    saved = old.state_dict()
    assert saved["param_groups"][0]["fused"] is None
    new = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    new.load_state_dict(saved)
    assert new.param_groups[0]["fused"] is None  # what with_settings_of is for
    new = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    new.load_state_dict(with_settings_of(new, saved))
    assert new.param_groups[0]["fused"] is True and new.param_groups[0]["lr"] == 0.1
    for p in model.parameters():
        assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
    assert with_settings_of(new, {"state": {}}) == {"state": {}}  # malformed: left for load_state_dict to refuse
