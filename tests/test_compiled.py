"""The compiled step (bnsuite.compiled): any variant the fused and ATen steps do not cover, its seeds together under
torch.compile, against the eager step; its fallback to the eager step; when it is used."""

import copy

import pytest
import torch
from torch import nn

from bnsuite.core.spec import RunSpec
from bnsuite.training import compiled
from bnsuite.training.models import EagerStep, build_model
from bnsuite.training.train import train_seeds


@pytest.fixture
def compiler():
    """Skips where torch.compile cannot compile here (checked when a test asks, not at collection)."""
    if compiled.unavailable() is not None:
        pytest.skip(f"torch.compile does not work here: {compiled.unavailable()}")


def _batches(steps, batch, features=784, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(steps, batch, features, generator=generator, dtype=dtype) * 2 - 1
    return images, torch.randint(0, 10, (steps, batch), generator=generator)


@pytest.mark.compiles
@pytest.mark.parametrize("variant, steps", [("bn-after-relu", 4), ("bn-renorm4", 60)])
def test_the_compiled_step_trains_each_model_as_the_eager_step_does(compiler, variant, steps):
    # Variants no fused or ATen step covers (Batch Renorm past its 50-step warm-up, where its bounds open), two
    # seeds with their own learning rates, in float64 so that what is compared is the arithmetic: batched products
    # sum in another order than one model's.
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model(variant).to(torch.float64))
    references = [copy.deepcopy(model) for model in models]
    step = compiled.CompiledStep(models, lr=[0.05, 0.1], momentum=0.9)
    eager = [EagerStep(model, RunSpec(variant=variant, lr=lr))
             for model, lr in zip(references, (0.05, 0.1), strict=True)]
    images, labels = _batches(steps, 16)
    for index in range(steps):
        losses, logits = step(torch.stack([images[index]] * 2), torch.stack([labels[index]] * 2))
        assert logits.shape == (2, 16, 10)
        for model_index, eager_step in enumerate(eager):
            loss, _ = eager_step(images[index:index + 1], labels[index:index + 1])
            assert losses[model_index].item() == pytest.approx(loss.item(), rel=1e-9)
    assert step.step_name.startswith("compiled (inductor, torch ")
    for model, reference in zip(models, references, strict=True):
        expected = reference.state_dict()
        for name, value in model.state_dict().items():  # running estimates and batches tracked included
            # 60 steps of ghost batches of 4 amplify float64 rounding to about 1e-10; an error in the arithmetic
            # would show at float32's scale or above.
            torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-9)


class _ItemInForward(nn.Module):
    """A layer that reads a value out of the tensor in its forward: vmap refuses it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.view(len(x), -1)) * (2.0 if x.sum().item() > 0 else 1.0)


@pytest.mark.compiles
def test_a_model_that_cannot_be_compiled_trains_on_the_eager_step_and_the_step_says_why(compiler):
    torch.manual_seed(0)
    models = [_ItemInForward().double(), _ItemInForward().double()]
    references = [copy.deepcopy(model) for model in models]
    step = compiled.CompiledStep(models, lr=[0.1, 0.1], momentum=0.9)
    eager = [EagerStep(model, RunSpec(lr=0.1)) for model in references]
    images, labels = _batches(3, 8)
    for index in range(3):
        step(torch.stack([images[index]] * 2), torch.stack([labels[index]] * 2))
        for eager_step in eager:
            eager_step(images[index:index + 1], labels[index:index + 1])
    assert step.step_name.startswith("eager (compiling failed: ")
    for model, reference in zip(models, references, strict=True):  # the same eager arithmetic from the same start
        assert all(torch.equal(value, reference.state_dict()[name]) for name, value in model.state_dict().items())


@pytest.mark.compiles
def test_the_compiled_step_is_for_long_runs_on_a_cpu_unless_the_switch_says_otherwise(monkeypatch):
    model = build_model("bn-scratch")
    cpu = torch.device("cpu")
    monkeypatch.delenv(compiled.SWITCH_VARIABLE, raising=False)
    assert not compiled.wanted(model, 126, cpu)  # a smoke run: compiling would cost more than it saves
    assert not compiled.wanted(model, 10 * 938, torch.device("cuda"))
    assert compiled.wanted(model, 10 * 938, cpu) == (compiled.unavailable() is None)
    monkeypatch.setenv(compiled.SWITCH_VARIABLE, "1")
    assert compiled.wanted(model, 126, cpu) == (compiled.unavailable() is None)
    monkeypatch.setenv(compiled.SWITCH_VARIABLE, "0")
    compiled.unavailable.cache_clear()
    try:
        assert not compiled.wanted(model, 10 * 938, cpu)
        assert compiled.unavailable() == f"switched off by {compiled.SWITCH_VARIABLE}=0"
    finally:
        compiled.unavailable.cache_clear()


@pytest.mark.compiles
def test_records_of_a_compiled_group_name_the_step_and_their_group(compiler, mnist_dir, monkeypatch):
    monkeypatch.setenv(compiled.SWITCH_VARIABLE, "1")
    specs = [RunSpec(variant="bn-scratch", seed=seed, epochs=1, train_subset=256, batch_size=64) for seed in (0, 1)]
    records = train_seeds(specs, data_dir=mnist_dir)
    assert all(record.training_step.startswith("compiled (inductor") for record in records)
    assert all(record.runs_trained_together == 2 for record in records)
    assert records[0].train_losses != records[1].train_losses and records[0].test_accuracy > 20
