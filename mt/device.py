"""Devices and precision: picking the device a user names; what ``auto`` means for training
(``train.precision``) and for translating (``decode.dtype``) on this hardware, and why; bf16
autocast; the warning for CPUs that would only emulate bf16; which Adam kernel the optimizer takes
(fused where PyTorch has one; a resumed optimizer takes this process's).

``MT_AUTO_FP32=1`` in the environment makes ``auto`` mean fp32 everywhere (the test suite sets it,
so that its golden values do not depend on the machine; a test of ``auto`` itself removes it).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch

from mt.config import ConfigError


def pick_device(name: str) -> torch.device:
    """auto (CUDA when available), cpu, cuda or cuda:N -> a usable device, else a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = name[5:] if name.startswith("cuda:") else ("0" if name == "cuda" else None)
    if index is None or not index.isdigit():
        raise ConfigError(f"device {name!r}: choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available() or int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: no such CUDA device on this machine")
    return torch.device(name)


BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX-512, ARM
PIN = "MT_AUTO_FP32"


def cpu_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU flag that gives native bf16 ('' when there is none), or None where /proc/cpuinfo
    cannot be read (not Linux: cannot tell)."""
    try:
        flags = set(cpuinfo.read_text(errors="replace").split())
    except OSError:
        return None
    return next((flag for flag in BF16_FLAGS if flag in flags), "")


def slow_bf16_warning(device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """A warning when bf16 would run emulated on this CPU (no AVX512-BF16/AMX or ARM BF16), else ''.
    Emulated bf16 matmuls are ~100x slower than fp32 (1.2 vs 109 GFLOP/s measured on an AVX2 CPU)."""
    if device.type != "cpu" or cpu_bf16(cpuinfo) != "":
        return ""
    return ("this CPU has no native bf16 instructions (no avx512_bf16/amx_bf16 in /proc/cpuinfo): bf16 runs "
            "emulated, far slower than fp32; use fp32")


def choose_precision(requested: str, device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, str]:
    """The training precision for ``requested`` (fp32, bf16, fp16 or auto) on ``device``, and why.
    auto: bf16 where it is native (CUDA from Ampere on; CPUs with AMX or AVX512-BF16: on an AMD EPYC
    with AVX512-BF16, 2.5-2.8x fp32's training tokens/s, benchmarks/speed_train.md), fp16 with a loss
    scale on older GPUs, fp32 elsewhere."""
    if requested != "auto":
        return requested, "train.precision"
    if os.environ.get(PIN) == "1":
        return "fp32", f"auto: {PIN}=1"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return "bf16", f"auto: {name} computes in bf16"
        return "fp16", f"auto: {name} has no bf16 (before Ampere): fp16 with a dynamic loss scale"
    flag = cpu_bf16(cpuinfo)
    if flag:
        return "bf16", f"auto: this CPU has native bf16 ({flag})"
    return "fp32", ("auto: this CPU has no native bf16" if flag == "" else
                    "auto: no /proc/cpuinfo to tell whether this CPU has native bf16")


def choose_dtype(requested: str, device: torch.device, cpuinfo: Path = Path("/proc/cpuinfo"),
                 int8_missing: str = "") -> tuple[str, str]:
    """The translation dtype for ``requested`` (fp32, bf16, int8 or auto) on ``device``, and why.
    auto: the fastest mode measured there, at the fp32 model's BLEU within 0.1 (benchmarks/
    speed_decode.md): bf16 on CUDA GPUs from Ampere on and on CPUs with native bf16 (bf16 1.2x int8
    on a Xeon with AMX; 1.02-1.04x on an AMD EPYC with AVX512-BF16, two runs); int8 on other x86
    CPUs where PyTorch's int8 kernels run (``int8_missing``: why they cannot, '' when they can):
    1.25x fp32 on AVX2; else fp32."""
    if requested != "auto":
        return requested, "decode.dtype"
    if os.environ.get(PIN) == "1":
        return "fp32", f"auto: {PIN}=1"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} computes in bf16"
        return "fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16"
    if device.type != "cpu":
        return "fp32", f"auto: {device.type}"
    flag = cpu_bf16(cpuinfo)
    if flag:
        return "bf16", f"auto: this CPU has native bf16 ({flag})"
    if not int8_missing:
        return "int8", "auto: int8 kernels" + (" (no native bf16 on this CPU)" if flag == "" else "")
    return "fp32", "auto: no native bf16 and no int8 kernels"


def fused_adam(device: torch.device) -> bool:
    """Whether Adam(W) takes PyTorch's fused kernel on ``device`` (one pass over each parameter, where
    the default takes several): on CPU and CUDA. The same update up to fp32 rounding (on an AMD EPYC
    with AVX512-BF16, 3% more bf16 training tokens/s, ~1% in fp32)."""
    return device.type in ("cpu", "cuda")


KERNEL_SETTINGS = ("fused", "foreach")  # how an optimizer computes, not what: this process's choice


def with_settings_of(optimizer: torch.optim.Optimizer, saved: dict,
                     keys: tuple[str, ...] | None = KERNEL_SETTINGS) -> dict:
    """``saved`` (an optimizer state dict) with ``optimizer``'s settings ``keys`` (None: all of them)
    in each param group, to load into it: ``load_state_dict`` takes every setting from the saved
    groups and places the step counters for the saved kernel, so a checkpoint from before fused Adam,
    or from another device, would otherwise resume unfused (or, on CUDA, fused with its counters on
    the wrong device)."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if (not isinstance(groups, list) or len(groups) != len(optimizer.param_groups)
            or not all(isinstance(g, dict) for g in groups)):
        return saved  # load_state_dict says what is wrong with it
    mine = [{k: v for k, v in g.items() if k != "params" and (keys is None or k in keys)}
            for g in optimizer.param_groups]
    return {**saved, "param_groups": [{**g, **m} for g, m in zip(groups, mine)]}


def autocast(device: torch.device, precision: str):
    """bf16 or fp16 autocast on ``device`` for precision "bf16" or "fp16"; no change for "fp32"."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()
