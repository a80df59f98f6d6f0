"""The study's training step for `plain` and `bn`: backward written out, seeds batched together.

Autograd and `torch.optim` cost tens of microseconds of bookkeeping per op,
which at batch 64 on a CPU is as much time as the matmuls themselves. This
module runs the same ATen kernels the eager path runs (matmuls, log_softmax,
native_batch_norm and its backward, threshold_backward, fused SGD) with the
gradients derived by hand, so the arithmetic is the study's and the
bookkeeping is gone. tests/test_train.py checks it against the eager path.

Runs that differ only in their seed train as one computation: S models'
weights are stacked into (S, ...) tensors, every matmul is a batched matmul
over the S models, and batch norm sees the S models' features side by side,
(B, S * features), so each feature is still normalized over its own model's
batch. Every op is independent per model and rounds as it does for one
model, so a run's trajectory is the one it has when trained alone, bit for
bit (tested); what the S runs share is the per-op overhead, paid once per
step instead of S times.

For logits z = a2 W3^T + b3 and loss L = mean_i -log softmax(z_i)[y_i]:

    dL/dz   = (softmax(z) - onehot(y)) / B
    dL/dW   = dL/dout^T @ input,  dL/db = sum over the batch of dL/dout
    dL/dinput = dL/dout @ W, masked by ReLU where its output was 0
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from bnsuite.models import SimpleNN, SimpleNNWithBN

BN_EPS = 1e-5  # nn.BatchNorm1d's defaults, which the bn variant uses
BN_MOMENTUM = 0.1
VARIANTS = ("plain", "bn")  # the variants whose networks the fast step covers
# A batched matmul of several 10-row products (fc3's weight gradient) rounds differently from the same
# product done alone (measured with this torch's MKL); one matmul per model keeps each run's arithmetic
# independent of how many seeds it trains with. Every other matmul here is the same either way (tested).
PER_MODEL_WEIGHT_GRADIENTS = ("fc3",)


def supports(model: nn.Module) -> bool:
    """The fast step covers exactly the study's two networks (with torch's own BatchNorm1d)."""
    if type(model) is SimpleNN:
        return True
    return type(model) is SimpleNNWithBN and all(
        type(layer) is nn.BatchNorm1d and layer.eps == BN_EPS and layer.momentum == BN_MOMENTUM
        for layer in (model.bn1, model.bn2)
    )


class FastStep:
    """One SGD-with-momentum step of S same-shaped models on S batches, in place.

    The models keep working as modules: their parameters and BN running
    statistics become views into the stacked tensors this step updates, so
    evaluating a model or reading its state_dict needs no copy back.
    """

    def __init__(self, models: Sequence[nn.Module], *, lr: float, momentum: float):
        models = list(models)
        for model in models:
            if not supports(model):
                raise TypeError(f"FastStep supports SimpleNN and SimpleNNWithBN, not {type(model).__name__}")
        if not models or len({type(model) for model in models}) != 1:
            raise ValueError("FastStep needs one or more models of the same class")
        self.models = models
        self.lr = lr
        self.momentum = momentum
        self.use_bn = isinstance(models[0], SimpleNNWithBN)
        self.weights = {name: _stack_into(models, name) for name, _ in models[0].named_parameters()}
        self.gradients = {name: torch.zeros_like(weight) for name, weight in self.weights.items()}
        momentum_buffers = [torch.zeros_like(weight) for weight in self.weights.values()]
        # The SGD update takes each model's slice as a tensor of its own: the kernel's vectorized body and
        # scalar tail then split every tensor as they do for one model, so no run's rounding depends on
        # how many seeds it trains with.
        self.update_lists = [
            [tensor[index] for tensor in stacked for index in range(len(models))]
            for stacked in (list(self.weights.values()), list(self.gradients.values()), momentum_buffers)
        ]
        if self.use_bn:
            self.running = {name: _stack_into(models, name) for name in (
                "bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var")}
            self.batches_tracked = _stack_into(models, "bn1.num_batches_tracked", "bn2.num_batches_tracked")
        self.first_step = True

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update every model on its own batch: images (S, B, ...), labels (S, B) -> losses (S,), logits (S, B, 10)."""
        w, g = self.weights, self.gradients
        models, batch = labels.shape
        x = images.reshape(models, batch, -1)
        h1 = _linear(x, w, "fc1")
        a1, bn1_saved = self._normalize_relu(h1, "bn1")
        h2 = _linear(a1, w, "fc2")
        a2, bn2_saved = self._normalize_relu(h2, "bn2")
        logits = _linear(a2, w, "fc3")
        log_probabilities = torch.log_softmax(logits, dim=2)
        label_index = labels.unsqueeze(2)
        losses = log_probabilities.gather(2, label_index).mean(dim=(1, 2)).neg_()

        grad_logits = log_probabilities.exp()
        grad_logits.scatter_add_(2, label_index, _minus_ones(models, batch, logits))
        grad_logits.mul_(1.0 / batch)
        grad_a2 = self._linear_backward(grad_logits, a2, "fc3")
        grad_h2 = self._relu_normalize_backward(grad_a2, a2, bn2_saved, "bn2")
        grad_a1 = self._linear_backward(grad_h2, a1, "fc2")
        grad_h1 = self._relu_normalize_backward(grad_a1, a1, bn1_saved, "bn1")
        torch.bmm(grad_h1.transpose(1, 2), x, out=g["fc1.weight"])  # fc1's input needs no gradient
        torch.sum(grad_h1, dim=1, out=g["fc1.bias"])

        torch._fused_sgd_(
            *self.update_lists,
            weight_decay=0.0, momentum=self.momentum, lr=self.lr, dampening=0.0,
            nesterov=False, maximize=False, is_first_step=self.first_step,
        )
        self.first_step = False
        return losses, logits

    def _normalize_relu(self, h: torch.Tensor, name: str):
        """ReLU(BN(h)) for bn (the S models' features side by side), ReLU(h) for plain."""
        if not self.use_bn:
            return h.relu_(), None  # the ReLU output alone decides its gradient mask
        models, batch, features = h.shape
        self.batches_tracked[0 if name == "bn1" else 1].add_(1)
        side_by_side = h.transpose(0, 1).reshape(batch, models * features)
        normalized, saved_mean, saved_invstd = torch.native_batch_norm(
            side_by_side, self.weights[f"{name}.weight"].view(-1), self.weights[f"{name}.bias"].view(-1),
            self.running[f"{name}.running_mean"].view(-1), self.running[f"{name}.running_var"].view(-1),
            True, BN_MOMENTUM, BN_EPS,
        )
        activation = normalized.relu_().view(batch, models, features).transpose(0, 1)
        return activation, (side_by_side, saved_mean, saved_invstd)

    def _relu_normalize_backward(self, grad_out, activation, saved, name):
        grad = torch.ops.aten.threshold_backward(grad_out, activation, 0)
        if saved is None:
            return grad
        side_by_side, saved_mean, saved_invstd = saved
        models, batch, features = grad.shape
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad.transpose(0, 1).reshape(batch, models * features), side_by_side,
            self.weights[f"{name}.weight"].view(-1),
            self.running[f"{name}.running_mean"].view(-1), self.running[f"{name}.running_var"].view(-1),
            saved_mean, saved_invstd, True, BN_EPS, [True, True, True],
        )
        self.gradients[f"{name}.weight"].view(-1).copy_(grad_weight)
        self.gradients[f"{name}.bias"].view(-1).copy_(grad_bias)
        return grad_input.view(batch, models, features).transpose(0, 1)

    def _linear_backward(self, grad_out, layer_input, name):
        grad_weight = self.gradients[f"{name}.weight"]
        if name in PER_MODEL_WEIGHT_GRADIENTS:
            for index in range(len(self.models)):
                torch.mm(grad_out[index].t(), layer_input[index], out=grad_weight[index])
        else:
            torch.bmm(grad_out.transpose(1, 2), layer_input, out=grad_weight)
        torch.sum(grad_out, dim=1, out=self.gradients[f"{name}.bias"])
        return torch.bmm(grad_out, self.weights[f"{name}.weight"])


def _linear(x: torch.Tensor, weights: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """x (S, B, in) -> (S, B, out), each model through its own layer."""
    return torch.baddbmm(weights[f"{name}.bias"].unsqueeze(1), x, weights[f"{name}.weight"].transpose(1, 2))


def _stack_into(models: list[nn.Module], *names: str) -> torch.Tensor:
    """The models' tensors `names` stacked as (len(names), S, ...), or (S, ...) for one name.

    Each model's own tensor becomes a view of its slice, so the model sees every in-place update.
    """
    stacked = torch.stack([torch.stack([_tensor(model, name) for model in models]) for name in names]).detach()
    for row, name in enumerate(names):
        for index, model in enumerate(models):
            _tensor(model, name).data = stacked[row, index]
    return stacked[0] if len(names) == 1 else stacked


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer called `name` (dotted, as in a state_dict)."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


_MINUS_ONES: dict[tuple, torch.Tensor] = {}


def _minus_ones(models: int, rows: int, like: torch.Tensor) -> torch.Tensor:
    key = (models, rows, like.device, like.dtype)
    if key not in _MINUS_ONES:
        _MINUS_ONES[key] = torch.full((models, rows, 1), -1.0, device=like.device, dtype=like.dtype)
    return _MINUS_ONES[key]
