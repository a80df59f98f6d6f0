"""What training *should* cost: analytic FLOPs of the seed networks and the machine's matmul peak.

Achieved training FLOP/s divided by the float32 matmul FLOP/s of the same
machine, measured in the same run, says how close a training path gets to
the hardware, independent of how fast or loaded the machine happens to be.
"""

from __future__ import annotations

import time

import torch
from torch import nn

PEAK_MATRIX_SIZE = 2048  # large enough to run at the BLAS library's best rate on a CPU


def training_flops_per_sample(model: nn.Module) -> int:
    """Matmul FLOPs of one sample's forward and backward pass through the model's Linear layers.

    Forward: 2*in*out per layer. Backward: 2*in*out for the weight gradient,
    and 2*in*out for the input gradient except in the first layer, whose
    input (the image) needs none. BN, ReLU, loss and optimizer work is
    elementwise, under 1% of this, and not counted.
    """
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    flops = 0
    for index, layer in enumerate(linears):
        per_pass = 2 * layer.in_features * layer.out_features
        flops += per_pass * (2 if index == 0 else 3)
    return flops


def matmul_peak_flops(device: torch.device | str = "cpu", *, seconds: float = 1.0) -> float:
    """Measured float32 matmul FLOP/s of `device` on square matrices (best of repeated timings)."""
    device = torch.device(device)
    a = torch.randn(PEAK_MATRIX_SIZE, PEAK_MATRIX_SIZE, device=device)
    b = torch.randn(PEAK_MATRIX_SIZE, PEAK_MATRIX_SIZE, device=device)
    flops_per_product = 2 * PEAK_MATRIX_SIZE**3
    best = float("inf")
    deadline = time.perf_counter() + seconds
    for _ in range(3):  # warm-up: thread pools and caches
        a @ b
    while time.perf_counter() < deadline or best == float("inf"):
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        _synchronize(device)
        best = min(best, (time.perf_counter() - started) / 4)
    return flops_per_product / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
