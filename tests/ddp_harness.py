"""Runs ``mt.train.train`` as torchrun runs it (one process per rank) and records, per rank, what the
tests compare: the gradients after update 1, the final weights, the examples of every update, and the
threads left once training has returned (Linux: their names).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_harness.py OUT CONFIG [KEY=VALUE ...] [--resume]
"""

import json
import os
import sys
from pathlib import Path

import torch

import mt.train as T
from mt.config import load_config

out, config, overrides = Path(sys.argv[1]), sys.argv[2], [a for a in sys.argv[3:] if a != "--resume"]
resume = "--resume" in sys.argv[3:]
rank = int(os.environ.get("RANK", "0"))
accumulate, fit = T.Trainer.accumulate, T.Trainer.fit
seen: list[list[int]] = []


def record(self, group):
    result = accumulate(self, group)
    seen.append([int(i) for batch in group for i in batch.indices])
    if self.state.step == 1:
        torch.save({n: p.grad.clone() for n, p in self.model.named_parameters()}, out / f"grads{rank}.pt")
    return result


def fit_and_dump(self):
    stopped = fit(self)
    torch.save(self.model.state_dict(), out / f"weights{rank}.pt")
    (out / f"seen{rank}.json").write_text(json.dumps(seen))
    return stopped


T.Trainer.accumulate, T.Trainer.fit = record, fit_and_dump
result = T.train(load_config(config, overrides), resume=resume, log=lambda m: print(m, file=sys.stderr), progress=False)
if os.path.isdir("/proc/self/task"):
    threads = [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    (out / f"threads{rank}.json").write_text(json.dumps(threads))
sys.exit(128 + result.signal if result.signal else 0)
