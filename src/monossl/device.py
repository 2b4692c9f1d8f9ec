"""Choosing the device and the numerics that pay on it.

All code asks this module for its device instead of calling `.cuda()`: `auto` means
CUDA when there is one, else CPU. On CUDA we train in bf16 autocast (it pays on
tensor-core GPUs); on CPU we stay in fp32 (bf16 is slower there without AMX, and would
change the numbers). Channels-last pays on both: on this project's 2-core CPU machine RotNet
trained at 146 images/s with it against 137 without on the 32-64-128-256 trunk (5x5 conv1), about 2x
faster on the 64-128-256-512 trunk (benchmarks/bench_train.py, --contiguous for NCHW).
"""

from __future__ import annotations

import contextlib

import torch

from monossl.errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise UserError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, not {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last
