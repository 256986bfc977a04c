"""What every benchmark shares: the hardware line printed beside each figure, an evaluation counter,
the device sync and the measured matmul rate MFU is read against."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


class CountingModel:
    """Wraps a model to count evaluations (NFE) per sample."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        return self.model(x, t, y)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s of this device in ``dtype`` (8192^3 on GPUs, 1024^3 on CPUs)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < 1.0:
        a @ b
        reps += 1
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)
