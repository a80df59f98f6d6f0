"""The study's original input pipeline: torchvision Dataset + transforms + DataLoader.

Kept so that bnsuite's tensor path can be checked against it, number for
number (same batches, same arithmetic) and timed against it (how much of the
original's time was spent feeding data rather than training). The loop is the
original code's: zero_grad, forward, loss, backward, step, `loss.item()`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from bnsuite.core.spec import RunSpec
from bnsuite.training.data import Splits, dataset_info, default_data_dir, split_indices
from bnsuite.training.models import make_optimizer

STUDY_TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])


def study_transform(dataset: str) -> transforms.Compose:
    """ToTensor + Normalize with the dataset's constants (bnsuite.datasets): the study's for MNIST."""
    mean, std = dataset_info(dataset).normalization
    return STUDY_TRANSFORM if mean == (0.5,) and std == (0.5,) else transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(mean, std)])


def original_loader(spec: RunSpec, generator: torch.Generator, *, data_dir: Path | str | None = None) -> DataLoader:
    """The study's training DataLoader over the same images bnsuite's tensor path trains on.

    Expects the raw files in place (bnsuite.data.load_splits puts them there).
    """
    root = Path(data_dir) if data_dir else default_data_dir()
    info = dataset_info(spec.dataset)
    dataset_class = getattr(datasets, info.torchvision_class)
    full = dataset_class(str(root), train=True, download=False, transform=study_transform(spec.dataset))
    kept, _ = split_indices(info.train_images, spec.validation_size, split_seed=0)
    dataset = full if spec.train_size == info.train_images else Subset(full, kept[: spec.train_size].tolist())
    return DataLoader(dataset, batch_size=spec.batch_size, shuffle=True, generator=generator)


class OriginalEpochs:
    """One training epoch per call, through the DataLoader, as the original ran; one run at a time."""

    step_name = "original"  # RunRecord.training_step

    def __init__(self, specs: list[RunSpec], models: list[nn.Module], shuffles: list[torch.Generator],
                 splits: Splits, *, dropout_generators: list[torch.Generator], data_dir: Path | str | None = None):
        """`dropout_generators` are the fast step's: the original loop's dropout draws from torch's own RNG."""
        if len(specs) != 1:
            raise ValueError("the original pipeline trains one run at a time")
        spec, self.model = specs[0], models[0]
        self.loader = original_loader(spec, shuffles[0], data_dir=data_dir)
        self.optimizer = make_optimizer(self.model, spec, fused=False)
        self.device = next(self.model.parameters()).device

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        self.model.train()
        losses, correct = [], 0
        for images, labels in self.loader:
            images, labels = images.to(self.device), labels.to(self.device)
            self.optimizer.zero_grad()
            outputs = self.model(images)
            loss = F.cross_entropy(outputs, labels)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
            correct += (outputs.argmax(dim=1) == labels).sum().item()
        return torch.tensor([losses]), torch.tensor([correct]), len(losses)  # (1, steps), (1,), steps: one run
