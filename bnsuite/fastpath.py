"""The study's training step for `plain` and `bn`, with the backward pass written out.

Autograd and `torch.optim` cost tens of microseconds of bookkeeping per op,
which at batch 64 on a CPU is as much time as the matmuls themselves. This
module runs the same ATen kernels the eager path runs (addmm, log_softmax,
nll_loss, native_batch_norm and its backward, threshold_backward, fused SGD)
with the gradients derived by hand, so the arithmetic is the study's and the
bookkeeping is gone. `tests/test_fastpath.py` checks it against the eager path.

For logits z = a2 W3^T + b3 and loss L = mean_i -log softmax(z_i)[y_i]:

    dL/dz   = (softmax(z) - onehot(y)) / B
    dL/dW   = dL/dout^T @ input,  dL/db = sum over the batch of dL/dout
    dL/dinput = dL/dout @ W, masked by ReLU where its output was 0
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bnsuite.models import SimpleNN, SimpleNNWithBN

BN_EPS = 1e-5  # nn.BatchNorm1d's defaults, which the bn variant uses
BN_MOMENTUM = 0.1


def supports(model: nn.Module) -> bool:
    """The fast step covers exactly the study's two networks (with torch's own BatchNorm1d)."""
    if type(model) is SimpleNN:
        return True
    return type(model) is SimpleNNWithBN and all(
        type(layer) is nn.BatchNorm1d and layer.eps == BN_EPS and layer.momentum == BN_MOMENTUM
        for layer in (model.bn1, model.bn2)
    )


class FastStep:
    """One SGD-with-momentum step of `model` on a batch, in place, returning the batch loss (a 0-d tensor)."""

    def __init__(self, model: nn.Module, *, lr: float, momentum: float):
        if not supports(model):
            raise TypeError(f"FastStep supports SimpleNN and SimpleNNWithBN, not {type(model).__name__}")
        self.model = model
        self.lr = lr
        self.momentum = momentum
        self.use_bn = isinstance(model, SimpleNNWithBN)
        self.parameters = list(model.parameters())
        self.gradients = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        self.momentum_buffers = [torch.zeros_like(p) for p in self.parameters]
        self.first_step = True

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) for the batch, after updating the parameters."""
        m, g = self.model, self.gradients
        x = images.view(images.size(0), -1)
        h1 = torch.addmm(m.fc1.bias, x, m.fc1.weight.t())
        a1, bn1_saved = self._normalize_relu(h1, m.bn1 if self.use_bn else None)
        h2 = torch.addmm(m.fc2.bias, a1, m.fc2.weight.t())
        a2, bn2_saved = self._normalize_relu(h2, m.bn2 if self.use_bn else None)
        logits = torch.addmm(m.fc3.bias, a2, m.fc3.weight.t())
        log_probabilities = torch.log_softmax(logits, dim=1)
        loss = F.nll_loss(log_probabilities, labels)

        grad_logits = log_probabilities.exp()
        grad_logits.scatter_add_(1, labels.unsqueeze(1), _minus_ones(labels.size(0), logits))
        grad_logits.mul_(1.0 / labels.size(0))
        grad_a2 = self._linear_backward(grad_logits, a2, m.fc3, g["fc3.weight"], g["fc3.bias"])
        grad_h2 = self._relu_normalize_backward(grad_a2, a2, h2, bn2_saved, "bn2")
        grad_a1 = self._linear_backward(grad_h2, a1, m.fc2, g["fc2.weight"], g["fc2.bias"])
        grad_h1 = self._relu_normalize_backward(grad_a1, a1, h1, bn1_saved, "bn1")
        torch.mm(grad_h1.t(), x, out=g["fc1.weight"])  # fc1's input needs no gradient
        torch.sum(grad_h1, dim=0, out=g["fc1.bias"])

        torch._fused_sgd_(
            self.parameters, list(g.values()), self.momentum_buffers,
            weight_decay=0.0, momentum=self.momentum, lr=self.lr, dampening=0.0,
            nesterov=False, maximize=False, is_first_step=self.first_step,
        )
        self.first_step = False
        return loss, logits

    @staticmethod
    def _normalize_relu(h: torch.Tensor, bn: nn.BatchNorm1d | None):
        if bn is None:
            return h.relu_(), None  # the ReLU output alone decides its gradient mask
        bn.num_batches_tracked.add_(1)
        normalized, saved_mean, saved_invstd = torch.native_batch_norm(
            h, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, BN_MOMENTUM, BN_EPS
        )
        return normalized.relu_(), (bn, saved_mean, saved_invstd)

    def _relu_normalize_backward(self, grad_out, activation, pre_norm, saved, name):
        grad = torch.ops.aten.threshold_backward(grad_out, activation, 0)
        if saved is None:
            return grad
        bn, saved_mean, saved_invstd = saved
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad, pre_norm, bn.weight, bn.running_mean, bn.running_var,
            saved_mean, saved_invstd, True, BN_EPS, [True, True, True],
        )
        self.gradients[f"{name}.weight"].copy_(grad_weight)
        self.gradients[f"{name}.bias"].copy_(grad_bias)
        return grad_input

    @staticmethod
    def _linear_backward(grad_out, layer_input, layer, grad_weight, grad_bias):
        torch.mm(grad_out.t(), layer_input, out=grad_weight)
        torch.sum(grad_out, dim=0, out=grad_bias)
        return torch.mm(grad_out, layer.weight)


_MINUS_ONES: dict[tuple, torch.Tensor] = {}


def _minus_ones(rows: int, like: torch.Tensor) -> torch.Tensor:
    key = (rows, like.device, like.dtype)
    if key not in _MINUS_ONES:
        _MINUS_ONES[key] = torch.full((rows, 1), -1.0, device=like.device, dtype=like.dtype)
    return _MINUS_ONES[key]
