"""Training on several processes under torchrun (gloo on CPU, 1 thread per rank, dropout 0): the
ranks stay identical, 2 ranks equal 1 process accumulating 2 batches, and nothing hangs or repeats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mt import checkpoint as ckpt
from mt.config import config_from_dict, load_config, save_config
from mt.run import Run

ROOT = Path(__file__).resolve().parent.parent
HARNESS = ROOT / "tests" / "ddp_harness.py"


def corpus(tmp: Path, multi30k_head, n: int) -> dict:
    files = {}
    for split, count in (("train", n), ("val", 50)):
        for lang in ("de", "en"):
            path = tmp / f"{split}.{lang}"
            path.write_text("\n".join(multi30k_head(split, lang, count)) + "\n", encoding="utf-8")
            files[split, lang] = str(path)
    return {"train": {"src": files["train", "de"], "tgt": files["train", "en"]},
            "valid": {"src": files["val", "de"], "tgt": files["val", "en"]},
            "cache_dir": str(tmp / "cache"), "max_len": 64}


def config(tmp: Path, multi30k_head, spm_model: Path, n: int = 600, **train) -> Path:
    cfg = config_from_dict({
        "data": corpus(tmp, multi30k_head, n), "tokenizer": {"src_model": str(spm_model)},
        "model": {"d_model": 32, "n_heads": 2, "ffn_dim": 64, "encoder_layers": 1, "decoder_layers": 1,
                  "dropout": 0.0, "max_positions": 128},
        "train": {"max_tokens": 512, "lr": 2e-3, "warmup_steps": 2, "log_every": 1, "num_threads": 1,
                  "keep_checkpoints": 10, "valid_every": 1000, **train}})
    path = tmp / "config.yaml"
    save_config(cfg, path)
    return path


def run(out: Path, cfg: Path, *overrides: str, nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    """The harness on ``nproc`` ranks (torchrun), or as one plain process."""
    out.mkdir(parents=True, exist_ok=True)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launcher, str(HARNESS), str(out), str(cfg), *overrides], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_two_ranks_train_exactly_like_one_process_accumulating_two(tmp_path, multi30k_head, spm_model):
    cfg = config(tmp_path, multi30k_head, spm_model, max_steps=6)
    # the ranks make their batches ahead in a thread (train.prefetch, on by default only on CUDA); one process does
    # not; both segment every batch anew by sampling (data.sampling_alpha), the same way whoever makes the batch
    two = run(tmp_path / "two", cfg, f"train.run_dir={tmp_path / 'run2'}", "train.prefetch=2", "data.sampling_alpha=0.2")
    assert two.returncode == 0, two.stderr
    one = run(tmp_path / "one", cfg, f"train.run_dir={tmp_path / 'run1'}", "train.accum_steps=2",
              "data.sampling_alpha=0.2", nproc=1)
    assert one.returncode == 0, one.stderr

    g0, g1, g = (torch.load(tmp_path / d / f"grads{r}.pt") for d, r in (("two", 0), ("two", 1), ("one", 0)))
    assert max((g0[k] - g[k]).abs().max().item() for k in g) <= 1e-6  # the global-token normalisation
    assert all(torch.equal(g0[k], g1[k]) for k in g)  # DDP's all-reduce: the same gradients on both ranks
    w0, w1, w = (torch.load(tmp_path / d / f"weights{r}.pt") for d, r in (("two", 0), ("two", 1), ("one", 0)))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the ranks never drift apart
    assert max((w0[k] - w[k]).abs().max().item() for k in w) <= 1e-6
    assert losses(tmp_path / "run2") == pytest.approx(losses(tmp_path / "run1"), rel=1e-6)
    if sys.platform == "linux":  # the process group went with training: no gloo thread is left to die at exit
        for r in (0, 1):
            assert not [t for t in json.loads((tmp_path / "two" / f"threads{r}.json").read_text()) if "gloo" in t]
    # rank 0 alone wrote the run; its checkpoint holds the unwrapped model (no DDP "module." prefix)
    saved = ckpt.load(Run(tmp_path / "run2").checkpoint_path("last"))
    assert saved["trainer"]["step"] == 6 and not any(k.startswith("module.") for k in saved["model"])
    assert all(torch.equal(saved["model"][k], w0[k]) for k in w0)
    assert len(saved["rng"]["ranks"]) == 2
    seen0, seen1 = (json.loads((tmp_path / "two" / f"seen{r}.json").read_text()) for r in (0, 1))
    assert not set(sum(seen0, [])) & set(sum(seen1, []))  # each rank its own batches
    assert "Traceback" not in two.stderr


def odd_epoch_config(tmp: Path, multi30k_head, spm_model: Path, **train) -> Path:
    """A config whose training epoch has an odd number of batches (so 2 ranks end unevenly)."""
    from mt.prepare import load_split
    from mt.tokenizer import Tokenizer

    tok = Tokenizer(spm_model)
    for n in range(300, 340):
        path = config(tmp, multi30k_head, spm_model, n=n, **train)
        cfg = load_config(path)
        if len(load_split(cfg, "train", tok, tok, progress=False).sampler(512, shuffle=True, seed=1).batches(0)) % 2:
            return path
    raise AssertionError("no corpus size gave an odd number of batches")


def test_an_uneven_last_update_does_not_hang_and_every_example_is_seen_once(tmp_path, multi30k_head, spm_model):
    cfg = odd_epoch_config(tmp_path, multi30k_head, spm_model, max_epochs=1)
    result = run(tmp_path / "out", cfg, f"train.run_dir={tmp_path / 'run'}", "train.prefetch=1", timeout=120)
    assert result.returncode == 0, result.stderr
    seen = [json.loads((tmp_path / "out" / f"seen{r}.json").read_text()) for r in (0, 1)]
    state = ckpt.load(Run(tmp_path / "run").checkpoint_path("last"))
    examples = sorted(sum(seen[0], []) + sum(seen[1], []))
    assert examples == list(range(state["sampler"]["num_examples"]))  # the epoch, each example exactly once
    assert len(seen[0]) == len(seen[1]) == state["trainer"]["step"]
    assert seen[1][-1] == [] and seen[0][-1], "the epoch ends with rank 1 holding no batch (a zero-weight one)"


def test_a_two_rank_checkpoint_resumed_on_one_process_finishes_the_epoch_exactly_once(tmp_path, multi30k_head,
                                                                                       spm_model):
    cfg = config(tmp_path, multi30k_head, spm_model, n=300, max_epochs=1)
    first = run(tmp_path / "a", cfg, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=3")
    assert first.returncode == 0, first.stderr
    again = run(tmp_path / "b", cfg, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=0", "--resume", nproc=1)
    assert again.returncode == 0, again.stderr
    seen = [u for d, r in (("a", 0), ("a", 1), ("b", 0)) for u in json.loads((tmp_path / d / f"seen{r}.json").read_text())]
    examples = sorted(sum(seen, []))
    state = ckpt.load(Run(tmp_path / "run").checkpoint_path("last"))
    assert examples == list(range(state["sampler"]["num_examples"]))
    assert (state["trainer"]["epoch"], state["trainer"]["batch"]) == (1, 0)


def mt_train(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mt", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ranks_of(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the processes ``mt train --nproc`` started."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == launcher.pid:
                env = dict(v.split("=", 1) for v in open(f"/proc/{entry}/environ").read().split("\0") if "=" in v)
                found[int(env["RANK"])] = int(entry)
        except (OSError, ValueError, IndexError, KeyError):
            continue
    return found


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_with_a_checkpoint_and_resume_gives_the_same_losses(tmp_path, multi30k_head,
                                                                                             spm_model):
    import signal
    import time

    cfg = config(tmp_path, multi30k_head, spm_model, max_steps=40, valid_every=10)
    full = mt_train(str(cfg), "-o", str(tmp_path / "full"), "-q", "--nproc", "2", "model.dropout=0.1")
    assert full.wait(timeout=180) == 0, full.stderr.read()

    killed = mt_train(str(cfg), "-o", str(tmp_path / "killed"), "-q", "--nproc", "2", "model.dropout=0.1")
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while not last.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert last.exists(), killed.stderr.read()
    ranks = ranks_of(killed)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGTERM)  # one rank only: the other learns it through the stop decision
    assert killed.wait(timeout=60) == 128 + signal.SIGTERM
    stderr = killed.stderr.read()
    assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr, stderr
    step = ckpt.load(last)["trainer"]["step"]
    assert 10 <= step < 40 and max(losses(tmp_path / "killed")) == step

    resumed = mt_train("-o", str(tmp_path / "killed"), "--resume", "-q", "--nproc", "2")
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read()
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")  # step by step, bit for bit


def test_two_agents_on_localhost_train_as_one_run(tmp_path, multi30k_head, spm_model):
    """``torchrun --nnodes 2`` with c10d rendezvous, both "nodes" on this machine: the same run as
    two processes of one agent."""
    import socket

    cfg = config(tmp_path, multi30k_head, spm_model, max_steps=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    (tmp_path / "nodes").mkdir()
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mt-test",
                                str(HARNESS), str(tmp_path / "nodes"), str(cfg), f"train.run_dir={tmp_path / 'run'}"],
                               env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    for agent in agents:
        assert agent.wait(timeout=120) == 0, agent.stderr.read()
    single = run(tmp_path / "one", cfg, f"train.run_dir={tmp_path / 'run1'}", "train.accum_steps=2", nproc=1)
    assert single.returncode == 0, single.stderr
    w0, w1, w = (torch.load(tmp_path / d / f"weights{r}.pt") for d, r in (("nodes", 0), ("nodes", 1), ("one", 0)))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert max((w0[k] - w[k]).abs().max().item() for k in w) <= 1e-6
    assert losses(tmp_path / "run") == pytest.approx(losses(tmp_path / "run1"), rel=1e-6)


def test_two_ranks_probe_their_speed_together_and_take_the_same_regime(tmp_path, multi30k_head, spm_model):
    from mt.prepare import load_split
    from mt.tokenizer import Tokenizer

    regimes = "[{min_epochs: 0.01, set: [model.dropout=0.1, train.max_tokens=256]}]"
    cfg = config(tmp_path, multi30k_head, spm_model, max_steps=4, max_time="1h", probe_steps=2)
    two = run(tmp_path / "two", cfg, f"train.run_dir={tmp_path / 'run'}", f"train.regimes={regimes}")
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("regime 1 of 1 (min_epochs 0.01): model.dropout=0.1, train.max_tokens=256") == 1  # rank 0 says it
    w0, w1 = (torch.load(tmp_path / "two" / f"weights{r}.pt") for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    written = load_config(tmp_path / "run" / "config.yaml")
    assert (written.model.dropout, written.train.max_tokens, written.train.regimes) == (0.1, 256, [])
    # each rank trained on its share of the chosen regime's 256-token batches
    tok = Tokenizer(spm_model)
    batches = load_split(load_config(cfg), "train", tok, tok, progress=False).sampler(256, shuffle=True, seed=1).batches(0)
    for rank in (0, 1):
        seen = json.loads((tmp_path / "two" / f"seen{rank}.json").read_text())
        assert [sorted(b) for b in seen] == [sorted(int(i) for i in batches[2 * u + rank]) for u in range(4)]
