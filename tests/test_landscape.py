"""Santurkar et al.'s measurements (bnsuite.landscape) against direct computations, and that they change nothing."""

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from bnsuite.training.landscape import STEP_FACTORS, gradient_ics, smoothness
from bnsuite.training.models import build_model


def _batch(seed=0, size=32):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 1, 28, 28, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def _direct_loss_and_gradient(model, images, labels):
    """The loss and its gradient as a training step computes them, on a copy of the model."""
    twin = copy.deepcopy(model).train()
    loss = F.cross_entropy(twin(images), labels)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in twin.named_parameters()}, twin


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_smoothness_is_the_loss_range_and_gradient_change_along_the_gradient_computed_directly(variant):
    torch.manual_seed(1)
    model, (images, labels), lr = build_model(variant), _batch(), 0.05
    loss, gradient, _ = _direct_loss_and_gradient(model, images, labels)
    losses, changes, betas = [loss], [], []
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in gradient.values()))
    for factor in STEP_FACTORS:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for name, parameter in moved.named_parameters():
                parameter -= factor * lr * gradient[name]
        there, gradient_there, _ = _direct_loss_and_gradient(moved, images, labels)
        change = math.sqrt(sum(float((gradient_there[n] - gradient[n]).double().pow(2).sum()) for n in gradient))
        losses.append(there)
        changes.append(change)
        betas.append(change / (factor * lr * norm))
    expected = (max(losses) - min(losses), max(changes), max(betas))
    assert smoothness(model, images, labels, lr) == pytest.approx(expected, rel=1e-4)


def test_gradient_ics_is_zero_when_the_layers_before_do_not_move_and_counts_only_the_layers_before():
    torch.manual_seed(2)
    model, (images, labels) = build_model("bn"), _batch(1)
    still = gradient_ics(model, images, labels, lr=0.0)
    assert still == {"fc2": (0.0, pytest.approx(1.0), 0.0), "fc3": (0.0, pytest.approx(1.0), 0.0)}
    shifted = gradient_ics(model, images, labels, lr=0.1)
    # fc2's G' moves fc1 and bn1 only: the same as moving them by hand and taking fc2's gradient directly.
    _, gradient, _ = _direct_loss_and_gradient(model, images, labels)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in moved.named_parameters():
            if name.startswith(("fc1.", "bn1.")):
                parameter -= 0.1 * gradient[name]
    _, gradient_there, _ = _direct_loss_and_gradient(moved, images, labels)
    g, g_prime = gradient["fc2.weight"].double(), gradient_there["fc2.weight"].double()
    assert shifted["fc2"][0] == pytest.approx(float((g - g_prime).norm()), rel=1e-4)
    assert shifted["fc2"][1] == pytest.approx(float((g * g_prime).sum() / (g.norm() * g_prime.norm())), rel=1e-6)
    assert shifted["fc2"][2] == pytest.approx(float((g - g_prime).norm() / g.norm()), rel=1e-4)  # scale-free



def test_measuring_leaves_parameters_buffers_and_the_random_state_as_they_were():
    torch.manual_seed(3)
    model, (images, labels) = build_model("bn-noisy"), _batch(2)  # its noise draws from torch's generator
    before = copy.deepcopy(model.state_dict())
    state = torch.get_rng_state()
    gradient_ics(model, images, labels, lr=0.1)
    smoothness(model, images, labels, lr=0.1)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), state)
    assert all(parameter.grad is None for parameter in model.parameters())
