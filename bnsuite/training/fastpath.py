"""The study's training step for `plain`, `bn` and their kin: backward written out, seeds batched together.

Autograd and `torch.optim` cost tens of microseconds of bookkeeping per op,
which at batch 64 on a CPU is as much time as the matmuls themselves. This
module runs the same ATen kernels the eager path runs (matmuls, log_softmax,
native_batch_norm and native_layer_norm and their backward,
threshold_backward, fused SGD) with the gradients derived by hand, so the
arithmetic is the study's and the bookkeeping is gone. Ghost-batch BN has no
ATen kernel; it is written with the tensor operations of
bnsuite.batchnorm.GhostBatchNorm1d, its backward by hand.

Runs that differ only in their seed, learning rate or init scale train as
one step over S models whose weights are stacked into (S, ...) tensors, built
so that a run trained with others equals, bit for bit, the run trained alone,
ragged last batches included: every matmul, sum over the batch, log_softmax
and LayerNorm once per model on its own tensors (the shapes, strides and
alignment it has alone); element-wise ops and batch norm over all models at
once, where no value depends on another model's. Which ops fall where, and
why each keeps the contract: docs/determinism.md.

For logits z = a2 W3^T + b3 and loss L = mean_i -log softmax(z_i)[y_i]:

    dL/dz   = (softmax(z) - onehot(y)) / B
    dL/dW   = dL/dout^T @ input,  dL/db = sum over the batch of dL/dout
    dL/dinput = dL/dout @ W, masked by ReLU where its output was 0

and for a ghost batch normalized as y = gamma * x_hat + beta, x_hat = (x - mean) / std:

    dL/dx = (g - mean(g) - x_hat * mean(g * x_hat)) / std,  g = dL/dy * gamma, means over the ghost batch
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from bnsuite.core.networks import BEFORE
from bnsuite.training.batchnorm import GhostBatchNorm1d, ghost_parts
from bnsuite.training.models import SimpleNN, SimpleNNWithBN, StackMLP, dropout_of

BN_EPS = 1e-5  # nn.BatchNorm1d's default, which the bn variant uses (and nn.LayerNorm's eps)
BN_MOMENTUM = 0.1  # nn.BatchNorm1d's default; the step takes any other the layers have (bn-ema0.99: 0.01)
ALIGNMENT = 64  # bytes: every model's block of an activation starts on a cache line, as a fresh tensor does
# Batch norm runs over the models' features side by side where each model has a whole number of 16-float vectors
# (AVX-512's width, twice AVX2's): there ATen's kernel computes each feature as it does for the model alone. A
# feature in a model's last partial vector (the papers' stacks have 100) is computed otherwise side by side than
# alone, so there batch norm runs once per model.
SIDE_BY_SIDE_FEATURES = 16


def supports(model: nn.Module) -> bool:
    """Whether the ATen fast step can train `model` (bnsuite.epochs.step_kind asks it, after the fused step; what
    neither covers trains on the compiled or the eager step, and its record says which). It covers the study's two
    networks (with torch's own BatchNorm1d, at any running-estimate momentum), their dropout variants, the network
    with ghost-batch BN or torch's LayerNorm in BN's place, and the papers' stacks (bnsuite.models.StackMLP: any
    depth, sigmoid or ReLU, with or without BatchNorm1d), judged by the modules' types, never by a variant's name."""
    return normalization(model) is not None


def hidden_layers(model: nn.Module) -> int:
    """The hidden layers of a network the step covers: a stack's own count, 2 for the study's MLP."""
    return model.hidden if isinstance(model, StackMLP) else 2


def normalization(model: nn.Module) -> str | None:
    """What the fast step normalizes `model` with: "none", "bn", "ghost" or "ln"; None if it does not cover it."""
    if type(model) is SimpleNN:
        return "none"
    if type(model) is SimpleNNWithBN and model.placement != BEFORE:
        return None  # BN after the ReLU: the fused step's only
    if type(model) is not SimpleNNWithBN and not isinstance(model, StackMLP):
        return None
    layers = [getattr(model, f"bn{layer}") for layer in range(1, hidden_layers(model) + 1)]
    if all(type(layer) is nn.Identity for layer in layers):
        return "none"
    if all(type(layer) is nn.BatchNorm1d and layer.eps == BN_EPS and layer.track_running_stats and layer.affine
           and isinstance(layer.momentum, float) and layer.momentum == layers[0].momentum for layer in layers):
        return "bn"
    if isinstance(model, StackMLP):
        return None
    if type(model) is not SimpleNNWithBN or dropout_of(model):
        return None  # ghost BN and LayerNorm without dropout only
    if all(type(layer) is GhostBatchNorm1d and layer.eps == BN_EPS and layer.momentum == BN_MOMENTUM
           and layer.ghost_size == layers[0].ghost_size for layer in layers):
        return "ghost"
    if all(type(layer) is nn.LayerNorm and layer.eps == BN_EPS and layer.elementwise_affine and layer.bias is not None
           for layer in layers):
        return "ln"
    return None


class FastStep:
    """One SGD-with-momentum step of S same-shaped models on S batches, in place.

    The models keep working as modules: their parameters and BN running
    statistics become views into the stacked tensors this step updates, so
    evaluating a model or reading its state_dict needs no copy back.
    """

    NAME = "fast"

    def __init__(self, models: Sequence[nn.Module], *, lr: float | Sequence[float], momentum: float,
                 dropout_generators: Sequence[torch.Generator] | None = None):
        """`dropout_generators`: one per model, for the dropout variants' masks (drawn as F.dropout draws them)."""
        models = list(models)
        for model in models:
            if not supports(model):
                raise TypeError(f"FastStep supports the study's networks and their dropout variants, "
                                f"not {type(model).__name__}")
        if not models or len({(type(model), type(getattr(model, "bn1", None)), hidden_layers(model),
                               getattr(model, "sigmoid", False), getattr(getattr(model, "bn1", None), "momentum", None),
                               getattr(getattr(model, "bn1", None), "ghost_size", None)) for model in models}) != 1:
            raise ValueError("FastStep needs one or more models of the same class")
        self.dropout, self.dropout_generators, lrs = per_model_settings("FastStep", models, lr, dropout_generators)
        self.models = models
        self.momentum = momentum
        self.hidden = hidden_layers(models[0])
        self.sigmoid = getattr(models[0], "sigmoid", False)  # a stack's nonlinearity: the sigmoid, else ReLU
        self.norm = normalization(models[0])
        self.bn_momentum = getattr(getattr(models[0], "bn1", None), "momentum", BN_MOMENTUM)
        self.ghost_size = getattr(models[0].bn1, "ghost_size", None) if self.norm == "ghost" else None
        self.weights = {name: stack_into(models, name) for name, _ in models[0].named_parameters()}
        self.gradients = {name: torch.zeros_like(weight) for name, weight in self.weights.items()}
        # Each model's slices, made once: the step's per-model calls index nothing.
        self.per_model = {name: tensor.unbind(0) for name, tensor in self.weights.items()}
        self.per_model_t = {name: [weight.t() for weight in self.per_model[name]]
                            for name in self.weights if name.endswith("weight")}
        self.per_model_grad = {name: tensor.unbind(0) for name, tensor in self.gradients.items()}
        momentum_buffers = [torch.zeros_like(weight) for weight in self.weights.values()]
        # One fused update per learning rate, each model's slice a tensor of its own (see the module docstring).
        self.updates: dict[float, list[list[torch.Tensor]]] = {}
        for index, model_lr in enumerate(lrs):
            lists = self.updates.setdefault(float(model_lr), [[], [], []])
            for slot, stacked in enumerate((self.weights.values(), self.gradients.values(), momentum_buffers)):
                lists[slot] += [tensor[index] for tensor in stacked]
        if self.norm in ("bn", "ghost"):
            layers = [f"bn{layer}" for layer in range(1, self.hidden + 1)]
            self.running = {f"{layer}.{name}": stack_into(models, f"{layer}.{name}")
                            for layer in layers for name in ("running_mean", "running_var")}
            self.batches_tracked = stack_into(models, *(f"{layer}.num_batches_tracked" for layer in layers))
            if self.hidden == 1:
                self.batches_tracked = self.batches_tracked.unsqueeze(0)
        self.first_step = True
        # The step's activations and gradients, allocated once per batch size and written in place every step
        # (the same blocks, so the same alignment). On a GPU the CUDA graph's memory pool owns them instead.
        self.workspace: dict[tuple[str, int], Blocks] | None = (
            {} if self.weights["fc1.weight"].device.type == "cpu" else None)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Update every model on its own batch: images (S, B, ...), labels (S, B) -> losses (S,), logits (S, B, 10).

        The logits are the step's own workspace: read them before the next step overwrites them.
        """
        models, batch = labels.shape
        x = images.reshape(models, batch, -1)
        x = Blocks(x, x.unbind(0))
        inputs, activations, saved, noises = [x], [], [], []  # per hidden layer: its input, output, BN, dropout
        for layer in range(1, self.hidden + 1):
            activation, normalized = self._normalize_relu(self._linear(inputs[-1], f"fc{layer}"), f"bn{layer}")
            dropped, noise = self._drop(activation, f"drop{layer}")
            activations.append(activation)
            saved.append(normalized)
            noises.append(noise)
            inputs.append(dropped)
        logits = self._linear(inputs[-1], f"fc{self.hidden + 1}")
        log_probabilities = self._empty("log_probabilities", models, batch, logits.all.shape[2], like=logits.all)
        grad_logits = self._empty("grad_logits", models, batch, logits.all.shape[2], like=logits.all)
        losses = []
        for logits_i, log_probabilities_i, grad_logits_i, labels_i in zip(
                logits.each, log_probabilities.each, grad_logits.each, labels.unbind(0), strict=True):
            torch.log_softmax(logits_i, 1, out=log_probabilities_i)
            torch.exp(log_probabilities_i, out=grad_logits_i)
            losses.append(F.nll_loss(log_probabilities_i, labels_i))  # cross_entropy's mean, as eager computes it
        label_index = labels.unsqueeze(2)

        grad_logits.all.scatter_add_(2, label_index, _minus_ones(models, batch, logits.all))
        grad_logits.all.mul_(1.0 / batch)
        grad = grad_logits
        for layer in range(self.hidden, 0, -1):
            grad_dropped = self._linear_backward(grad, inputs[layer], f"fc{layer + 1}")
            grad = self._relu_normalize_backward(self._drop_backward(grad_dropped, noises[layer - 1]),
                                                 activations[layer - 1], saved[layer - 1], f"bn{layer}")
        self._linear_backward(grad, x, "fc1", input_gradient=False)  # the images need no gradient
        self.update()
        return torch.stack(losses), logits.all

    def update(self) -> None:
        """SGD with momentum on every model from the gradients in place: one fused call per learning rate."""
        for lr, lists in self.updates.items():
            torch._fused_sgd_(
                *lists,
                weight_decay=0.0, momentum=self.momentum, lr=lr, dampening=0.0,
                nesterov=False, maximize=False, is_first_step=self.first_step,
            )
        self.first_step = False

    def _empty(self, key: str, models: int, rows: int, columns: int, *, like: torch.Tensor) -> Blocks:
        """The workspace block `key` for this batch size: made at its first step, reused after (on a CPU)."""
        if self.workspace is None:
            return _per_model_empty(models, rows, columns, like=like)
        blocks = self.workspace.get((key, rows))
        if blocks is None:
            blocks = self.workspace[(key, rows)] = _per_model_empty(models, rows, columns, like=like)
        return blocks

    def _linear(self, x: Blocks, name: str) -> Blocks:
        """x (S, B, in) -> (S, B, out): one GEMM per model, bias added as nn.Linear adds it."""
        weight_t, bias = self.per_model_t[f"{name}.weight"], self.per_model[f"{name}.bias"]
        models, batch, _ = x.all.shape
        out = self._empty(f"{name}.output", models, batch, weight_t[0].shape[1], like=x.all)
        for x_i, weight_t_i, bias_i, out_i in zip(x.each, weight_t, bias, out.each, strict=True):
            torch.addmm(bias_i, x_i, weight_t_i, out=out_i)
        return out

    def _linear_backward(self, grad_out: Blocks, layer_input: Blocks, name: str, *,
                         input_gradient: bool = True) -> Blocks | None:
        """Weight and bias gradients into self.gradients; returns the input gradient. One GEMM per model."""
        weight = self.per_model[f"{name}.weight"]
        grad_weight, grad_bias = self.per_model_grad[f"{name}.weight"], self.per_model_grad[f"{name}.bias"]
        for grad_out_t_i, grad_out_i, input_i, grad_weight_i, grad_bias_i in zip(
                grad_out.each_t, grad_out.each, layer_input.each, grad_weight, grad_bias, strict=True):
            torch.mm(grad_out_t_i, input_i, out=grad_weight_i)
            torch.sum(grad_out_i, dim=0, out=grad_bias_i)
        if not input_gradient:
            return None
        models, batch, _ = grad_out.all.shape
        grad_input = self._empty(f"{name}.grad_input", models, batch, weight[0].shape[1], like=grad_out.all)
        for grad_out_i, weight_i, grad_input_i in zip(grad_out.each, weight, grad_input.each, strict=True):
            torch.mm(grad_out_i, weight_i, out=grad_input_i)
        return grad_input

    def _drop(self, activation: Blocks, name: str) -> tuple[Blocks, Blocks | None]:
        """Dropout as F.dropout computes it: a Bernoulli(1 - p) mask from each model's generator, over 1 - p."""
        if not self.dropout:
            return activation, None
        noise = self._empty(f"{name}.noise", *activation.all.shape, like=activation.all)
        for noise_i, generator in zip(noise.each, self.dropout_generators, strict=True):
            noise_i.bernoulli_(1 - self.dropout, generator=generator)
        noise.all.div_(1 - self.dropout)
        dropped = self._empty(f"{name}.output", *activation.all.shape, like=activation.all)
        torch.mul(activation.all, noise.all, out=dropped.all)
        return dropped, noise

    @staticmethod
    def _drop_backward(grad: Blocks, noise: Blocks | None) -> Blocks:
        if noise is None:
            return grad
        grad.all.mul_(noise.all)
        return grad

    def _normalize_relu(self, h: Blocks, name: str):
        """ReLU(BN(h)) for bn (the S models' features side by side), ReLU(h) for plain (a stack's sigmoid in the
        ReLU's place); ghost-batch BN and LayerNorm in `_ghost_forward` and `_layer_norm_forward`."""
        if self.norm == "none":
            # The output alone decides the gradient: the ReLU's mask, the sigmoid's y (1 - y).
            if self.sigmoid:
                _sigmoid_each(h)
            else:
                h.all.relu_()
            return h, None
        if self.norm == "ln":
            return self._layer_norm_forward(h, name)
        self.batches_tracked[int(name.removeprefix("bn")) - 1].add_(1)
        if self.norm == "ghost":
            return self._ghost_forward(h, name)
        models, batch, features = h.all.shape
        if features % SIDE_BY_SIDE_FEATURES:
            return self._batch_norm_each(h, name)
        side_by_side = h.all.transpose(0, 1).reshape(batch, models * features)
        normalized, saved_mean, saved_invstd = torch.native_batch_norm(
            side_by_side, self.weights[f"{name}.weight"].view(-1), self.weights[f"{name}.bias"].view(-1),
            self.running[f"{name}.running_mean"].view(-1), self.running[f"{name}.running_var"].view(-1),
            True, self.bn_momentum, BN_EPS,
        )
        # The nonlinearity writes each model's activations back into a block of its own, as the next GEMM needs.
        activation = self._empty(f"{name}.activation", models, batch, features, like=h.all)
        per_model = normalized.view(batch, models, features).transpose(0, 1)
        if self.sigmoid:
            activation.all.copy_(per_model)
            _sigmoid_each(activation)
        else:
            torch.clamp_min(per_model, 0, out=activation.all)
        return activation, (side_by_side, saved_mean, saved_invstd)

    def _relu_normalize_backward(self, grad_out: Blocks, activation: Blocks, saved, name: str) -> Blocks:
        models, batch, features = grad_out.all.shape
        blocks = self._empty(f"{name}.relu_grad", models, batch, features, like=grad_out.all)
        if self.sigmoid:  # per model, as for the forward
            for grad_i, activation_i, blocks_i in zip(grad_out.each, activation.each, blocks.each, strict=True):
                torch.ops.aten.sigmoid_backward.grad_input(grad_i, activation_i, grad_input=blocks_i)
        else:
            torch.ops.aten.threshold_backward.grad_input(grad_out.all, activation.all, 0, grad_input=blocks.all)
        if saved is None:
            return blocks
        if self.norm == "ln":
            return self._layer_norm_backward(blocks, saved, name)
        if self.norm == "ghost":
            return self._ghost_backward(blocks, saved, name)
        if isinstance(saved, list):
            return self._batch_norm_each_backward(blocks, saved, name)
        grad = blocks.all
        side_by_side, saved_mean, saved_invstd = saved
        grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad.transpose(0, 1).reshape(batch, models * features), side_by_side,
            self.weights[f"{name}.weight"].view(-1),
            self.running[f"{name}.running_mean"].view(-1), self.running[f"{name}.running_var"].view(-1),
            saved_mean, saved_invstd, True, BN_EPS, [True, True, True],
        )
        self.gradients[f"{name}.weight"].view(-1).copy_(grad_weight)
        self.gradients[f"{name}.bias"].view(-1).copy_(grad_bias)
        per_model = self._empty(f"{name}.grad_input", models, batch, features, like=grad)
        per_model.all.copy_(grad_input.view(batch, models, features).transpose(0, 1))
        return per_model

    def _batch_norm_each(self, h: Blocks, name: str):
        """The nonlinearity of BN(h), batch norm once per model on its own block (see SIDE_BY_SIDE_FEATURES)."""
        models, batch, features = h.all.shape
        activation = self._empty(f"{name}.activation", models, batch, features, like=h.all)
        statistics = []
        for h_i, weight_i, bias_i, mean_i, var_i, activation_i in zip(
                h.each, self.per_model[f"{name}.weight"], self.per_model[f"{name}.bias"],
                self.running[f"{name}.running_mean"].unbind(0), self.running[f"{name}.running_var"].unbind(0),
                activation.each, strict=True):
            normalized_i, saved_mean_i, saved_invstd_i = torch.native_batch_norm(
                h_i, weight_i, bias_i, mean_i, var_i, True, self.bn_momentum, BN_EPS)
            if self.sigmoid:
                torch.sigmoid(normalized_i, out=activation_i)
            else:
                torch.clamp_min(normalized_i, 0, out=activation_i)
            statistics.append((h_i, saved_mean_i, saved_invstd_i))
        return activation, statistics

    def _batch_norm_each_backward(self, grad: Blocks, statistics: list, name: str) -> Blocks:
        models, batch, features = grad.all.shape
        per_model = self._empty(f"{name}.grad_input", models, batch, features, like=grad.all)
        for grad_i, (h_i, saved_mean_i, saved_invstd_i), weight_i, mean_i, var_i, out_i, grad_weight_i, grad_bias_i \
                in zip(grad.each, statistics, self.per_model[f"{name}.weight"],
                       self.running[f"{name}.running_mean"].unbind(0), self.running[f"{name}.running_var"].unbind(0),
                       per_model.each, self.per_model_grad[f"{name}.weight"], self.per_model_grad[f"{name}.bias"],
                       strict=True):
            grad_input_i, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
                grad_i, h_i, weight_i, mean_i, var_i, saved_mean_i, saved_invstd_i, True, BN_EPS, [True, True, True])
            out_i.copy_(grad_input_i)
            grad_weight_i.copy_(grad_weight)
            grad_bias_i.copy_(grad_bias)
        return per_model

    def _layer_norm_forward(self, h: Blocks, name: str):
        """ReLU(LayerNorm(h)): each image over its own features, so one call per model on its own block, with
        its own weight and bias (the eager step's kernel on the same tensors)."""
        models, batch, features = h.all.shape
        activation = self._empty(f"{name}.activation", models, batch, features, like=h.all)
        statistics = []
        for h_i, weight_i, bias_i, activation_i in zip(h.each, self.per_model[f"{name}.weight"],
                                                       self.per_model[f"{name}.bias"], activation.each, strict=True):
            normalized_i, mean_i, rstd_i = torch.native_layer_norm(h_i, [features], weight_i, bias_i, BN_EPS)
            torch.clamp_min(normalized_i, 0, out=activation_i)
            statistics.append((mean_i, rstd_i))
        return activation, (h, statistics)

    def _layer_norm_backward(self, grad: Blocks, saved, name: str) -> Blocks:
        h, statistics = saved
        models, batch, features = grad.all.shape
        per_model = self._empty(f"{name}.grad_input", models, batch, features, like=grad.all)
        for grad_i, h_i, (mean_i, rstd_i), weight_i, bias_i, out_i, grad_weight_i, grad_bias_i in zip(
                grad.each, h.each, statistics, self.per_model[f"{name}.weight"], self.per_model[f"{name}.bias"],
                per_model.each, self.per_model_grad[f"{name}.weight"], self.per_model_grad[f"{name}.bias"],
                strict=True):
            grad_input_i, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
                grad_i, h_i, [features], mean_i, rstd_i, weight_i, bias_i, [True, True, True])
            out_i.copy_(grad_input_i)
            grad_weight_i.copy_(grad_weight)
            grad_bias_i.copy_(grad_bias)
        return per_model

    def _ghost_forward(self, h: Blocks, name: str):
        """ReLU(ghost-batch BN(h)), written as bnsuite.batchnorm.GhostBatchNorm1d writes it, over every model at
        once: each (model, ghost batch, feature)'s statistics come from that model's own g values alone."""
        models, batch, features = h.all.shape
        x_hat = self._empty(f"{name}.x_hat", models, batch, features, like=h.all)
        stds = []
        for start, size, groups in ghost_parts(batch, self.ghost_size):
            x = h.all[:, start:start + size].reshape(models, groups, size // groups, features)
            mean = x.mean(dim=2, keepdim=True)
            centered = x - mean
            var = centered.pow(2).mean(dim=2, keepdim=True)
            std = torch.sqrt(var + BN_EPS)
            x_hat.all[:, start:start + size].copy_((centered / std).view(models, size, features))
            stds.append(std)
            if start == 0:  # the first ghost batch updates the running estimates, as under DDP (GhostBatchNorm1d)
                first = size // groups
                self.running[f"{name}.running_mean"].lerp_(mean[:, 0, 0], BN_MOMENTUM)
                self.running[f"{name}.running_var"].lerp_(var[:, 0, 0] * (first / (first - 1)), BN_MOMENTUM)
        weight = self.weights[f"{name}.weight"].unsqueeze(1)
        bias = self.weights[f"{name}.bias"].unsqueeze(1)
        activation = self._empty(f"{name}.activation", models, batch, features, like=h.all)
        torch.clamp_min(weight * x_hat.all + bias, 0, out=activation.all)
        return activation, (x_hat, stds)

    def _ghost_backward(self, blocks: Blocks, saved, name: str) -> Blocks:
        """dL/dx = (g - mean(g) - x_hat * mean(g * x_hat)) / std over each ghost batch, g = dL/dy * gamma."""
        x_hat, stds = saved
        grad = blocks.all
        models, batch, features = grad.shape
        for grad_i, x_hat_i, grad_weight_i, grad_bias_i in zip(blocks.each, x_hat.each,
                                                                self.per_model_grad[f"{name}.weight"],
                                                                self.per_model_grad[f"{name}.bias"], strict=True):
            torch.sum(grad_i * x_hat_i, dim=0, out=grad_weight_i)
            torch.sum(grad_i, dim=0, out=grad_bias_i)
        grad_x_hat = grad * self.weights[f"{name}.weight"].unsqueeze(1)
        per_model = self._empty(f"{name}.grad_input", models, batch, features, like=grad)
        for (start, size, groups), std in zip(ghost_parts(batch, self.ghost_size), stds, strict=True):
            shape = (models, groups, size // groups, features)
            g = grad_x_hat[:, start:start + size].reshape(shape)
            x = x_hat.all[:, start:start + size].reshape(shape)
            centered = g - g.mean(dim=2, keepdim=True) - x * (g * x).mean(dim=2, keepdim=True)
            per_model.all[:, start:start + size].copy_((centered / std).view(models, size, features))
        return per_model


def per_model_settings(step: str, models: Sequence[nn.Module], lr: float | Sequence[float],
                       dropout_generators: Sequence[torch.Generator] | None) -> tuple[float, list, list[float]]:
    """(dropout probability, one dropout generator per model, one learning rate per model) for a step over
    `models`, or ValueError naming `step` and what is missing."""
    dropout = dropout_of(models[0])
    if dropout and (dropout_generators is None or len(dropout_generators) != len(models)):
        raise ValueError(f"{step} needs one dropout generator per model for a dropout variant")
    lrs = [lr] * len(models) if isinstance(lr, (int, float)) else list(lr)
    if len(lrs) != len(models):
        raise ValueError(f"{step} got {len(lrs)} learning rates for {len(models)} models")
    return dropout, list(dropout_generators or []), lrs


def _sigmoid_each(blocks: Blocks) -> None:
    """The sigmoid in place, one call per model on its contiguous block: its vectorized kernel rounds otherwise than
    its scalar one, which a strided view of several models' blocks may take, and a model alone never does."""
    for block in blocks.each:
        block.sigmoid_()


class Blocks(NamedTuple):
    """A (S, rows, columns) tensor, its S per-model (rows, columns) views and their transposes, made once."""

    all: torch.Tensor
    each: tuple[torch.Tensor, ...]
    each_t: tuple[torch.Tensor, ...] = ()


def _per_model_empty(models: int, rows: int, columns: int, *, like: torch.Tensor) -> Blocks:
    """An uninitialized (models, rows, columns) tensor, each model's block contiguous and 64-byte aligned.

    Blocks are padded to a whole number of cache lines, so model i's block is
    aligned as a freshly allocated tensor is, whatever i and the batch size.
    """
    per_line = ALIGNMENT // like.element_size()
    block = -(-rows * columns // per_line) * per_line
    storage = torch.empty(models * block, device=like.device, dtype=like.dtype)
    stacked = storage.as_strided((models, rows, columns), (block, columns, 1))
    each = stacked.unbind(0)
    return Blocks(stacked, each, tuple(block.t() for block in each))


def stack_into(models: list[nn.Module], *names: str) -> torch.Tensor:
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
