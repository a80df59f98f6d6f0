"""train(spec) -> RunRecord and train_seeds(specs): the study's training protocol, on whole-dataset tensors.

The arithmetic is the study's: default init, CrossEntropyLoss, SGD with
momentum, a fresh shuffle every epoch, the last partial batch kept, and the
per-epoch figure is the mean of the per-batch losses. How an epoch is fed and
stepped is the pipeline's: `EPOCH_RUNNERS` maps each pipeline to its runner
(bnsuite.epochs for `fast` and `eager`, bnsuite.original for `original`),
and the loop here never knows which one it drives.

A study trains every (variant, batch size) with several seeds, and sweeps
learning rates and init scales; `train_seeds` trains runs that differ only in
those as one batched computation where the fast step covers the variant, each
run bit for bit as it trains alone (bnsuite.fastpath says how), so the per-op
overhead that dominates small batches on a CPU is paid once for the group.

Determinism: on a CPU the same spec and the same group give the same record,
bit for bit. On a GPU that needs torch's deterministic algorithms, which
`train_seeds` turns on for the run (and cuBLAS's fixed workspace, set here
before any CUDA work).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from bnsuite.core.datasets import DATASETS
from bnsuite.core.networks import NETWORKS
from bnsuite.core.records import EpochRecord, RunRecord, finite_or_none
from bnsuite.core.registry import checked, measure_definition
from bnsuite.core.spec import MEASUREMENTS, RunSpec, SpecError, StudySpec, Variant, is_precise_checkpoint
from bnsuite.training.data import load_splits
from bnsuite.training.environment import KEEP_DENORMALS_VARIABLE, describe_environment, flush_denormals, now_utc
from bnsuite.training.epochs import TensorEpochs, step_kind, training_set
from bnsuite.training.evaluation import evaluate, evaluate_all, evaluate_with_batch_statistics  # noqa: F401 (re-exported)
from bnsuite.training.models import build_model
from bnsuite.training.precise import precise_accuracies
from bnsuite.training.signal import measure_signal

# cuBLAS reads this when it first starts; deterministic GEMMs need it (torch's reproducibility notes).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# Subnormals flushed to zero on every CPU thread: set here, before torch's thread pool starts in this process
# (bnsuite.environment.flush_denormals says why; each record says what its threads did).
if os.environ.get(KEEP_DENORMALS_VARIABLE) != "1":
    flush_denormals()

EpochCallback = Callable[[RunSpec, EpochRecord], None]


class MeasureData(NamedTuple):
    """What a plugin's measure (bnsuite.registry.register_measure) is given beside the model, at an epoch end."""

    training_images: torch.Tensor  # the run's training set, as its epochs draw from it
    training_labels: torch.Tensor
    held_out_images: torch.Tensor  # the run's held-out set (RunSpec.held_out)
    held_out_labels: torch.Tensor
    spec: RunSpec


def _original_epochs(*args, measures=frozenset(), **kwargs):
    # Imported when first used: torchvision takes seconds to import, and only this pipeline needs it. It measures
    # nothing beyond what the original notebook did (neither probes nor `measures`).
    from bnsuite.training.original import OriginalEpochs

    return OriginalEpochs(*args, **kwargs)


# pipeline -> runner(specs, models, shuffles, splits, data_dir=..., measures=...), whose call trains one epoch.
EPOCH_RUNNERS = {"fast": TensorEpochs, "eager": TensorEpochs, "original": _original_epochs}
# A cross-entropy of 1,000 nats means logit gaps of 1,000: the weights have blown up.
# Training from default init starts near ln(10) = 2.3; a run past this never recovers
# (at lr 5.0, plain reaches 1e15 and then sits at chance with a finite loss).
DIVERGED_LOSS = 1_000.0
# The most runs one batched computation trains: a larger group trains as consecutive chunks of sizes as equal as
# can be, each run bit for bit as it trains alone either way (its record names the runs it trained with). The ATen
# step (bnsuite.fastpath) steps its models in lockstep, so past a few of them its working set leaves the caches: on
# an Intel Xeon (AVX-512, 2 cores) 21 runs at batch 64 trained together took 1.2-1.3x the time of the same runs in
# chunks of 7 to 11 (plain, bn; docs/performance.md). The fused step (bnsuite.fused) trains each model alone on a
# thread for a run of batches, so a group costs it nothing in cache and a larger one spreads better over the
# threads: a case trains as one group. BNSUITE_MAX_RUNS_TOGETHER sets one size for either.
MAX_RUNS_TOGETHER = 8
MAX_RUNS_TOGETHER_FUSED = 64
MAX_RUNS_TOGETHER_VARIABLE = "BNSUITE_MAX_RUNS_TOGETHER"


def max_runs_together(default: int = MAX_RUNS_TOGETHER) -> int:
    """The most runs trained as one computation: $BNSUITE_MAX_RUNS_TOGETHER, else `default` (the step's)."""
    value = os.environ.get(MAX_RUNS_TOGETHER_VARIABLE, str(default))
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"{MAX_RUNS_TOGETHER_VARIABLE}={value!r} is not a number of runs: set it to a whole number "
                         f"of 1 or more (1 trains every run alone), or unset it for the step's own ({default} for "
                         f"the ATen step, {MAX_RUNS_TOGETHER_FUSED} for the fused one)")
    return int(value)


def has_diverged(batch_losses: torch.Tensor) -> bool:
    """True when any batch loss is not finite or above DIVERGED_LOSS."""
    return not bool(torch.isfinite(batch_losses).all() and batch_losses.max() <= DIVERGED_LOSS)


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda if available, else cpu; an explicit cuda without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but torch sees no CUDA GPU here; use --bn-device cpu")
    return torch.device(device)


def train(
    spec: RunSpec,
    *,
    data_dir: Path | str | None = None,
    study: StudySpec | None = None,
    on_epoch: EpochCallback | None = None,
) -> RunRecord:
    """Train one model as `spec` says and return what happened, epoch by epoch.

    A loss that blows up (not finite, or above DIVERGED_LOSS) ends the run at the
    end of that epoch: the record says so (`diverged_at_epoch`) instead of
    raising, so a study keeps going. `study` is recorded as the study the run belongs to.
    """
    return train_seeds([spec], data_dir=data_dir, study=study, on_epoch=on_epoch)[0]


def train_seeds(
    specs: Sequence[RunSpec],
    *,
    data_dir: Path | str | None = None,
    study: StudySpec | None = None,
    on_epoch: EpochCallback | None = None,
    executor: str = "local",
    measures: Collection[str] | None = None,
) -> list[RunRecord]:
    """Train runs that differ only in seed, learning rate or init scale; one record each, in the order given.

    Where a step other than the eager one trains them (bnsuite.epochs.step_kind, the one place that decides),
    the runs train as one batched computation (bnsuite.fused, bnsuite.fastpath, bnsuite.compiled), or as
    consecutive chunks of at most `max_runs_together()`, each on its own init and its own shuffle (bit for bit as
    when trained alone, but on the compiled step), and each record names the runs it trained with; otherwise one
    after another. A run that diverges stops being
    recorded at that epoch while the others go on. `executor` is recorded as
    what ran them ("local", or "ray at ADDRESS, node ..." in a Ray task). `measures`: what the runs measure
    besides what every run records (spec.MEASUREMENTS); by default what `study` asks of them (StudySpec.measures).
    """
    specs = list(specs)
    _check_one_group(specs)
    variant = checked(specs[0])  # the variant is registered and can train these runs, or SpecError says what to change
    if measures is None:
        measures = study.measures(specs) if study is not None else frozenset()
    return [record for group in _groups(specs)
            for record in _train_group(group, variant, data_dir=data_dir, study=study, on_epoch=on_epoch,
                                       executor=executor, measures=measures)]


def _groups(specs: list[RunSpec]) -> list[list[RunSpec]]:
    """The groups `specs` train in, in order: one computation of all of them where a step other than the eager one
    trains them (bnsuite.epochs.step_kind decides), in consecutive chunks of sizes as equal as can be where they are
    more than `max_runs_together()`; on the eager step one run at a time."""
    spec = specs[0]
    info = DATASETS[spec.dataset]
    model = build_model(spec.variant, network=spec.network, image_shape=info.image_shape, classes=info.classes)
    kind = step_kind(model, spec, resolve_device(spec.device))
    if kind == "eager":
        return [[run] for run in specs]
    cap = max_runs_together(MAX_RUNS_TOGETHER_FUSED if kind == "fused" else MAX_RUNS_TOGETHER)
    chunks = -(-len(specs) // cap)
    bounds = [len(specs) * index // chunks for index in range(chunks + 1)]
    return [specs[start:end] for start, end in itertools.pairwise(bounds)]


def _train_group(specs: list[RunSpec], variant: Variant, *, data_dir: Path | str | None, study: StudySpec | None,
                 on_epoch: EpochCallback | None, executor: str, measures: Collection[str]) -> list[RunRecord]:
    """One group's training, start to records: its data and environment, its models and epoch runner, its
    epochs, then each run's record."""
    spec = specs[0]
    device = resolve_device(spec.device)
    splits = load_splits(spec.dataset, validation_size=spec.validation_size, data_dir=data_dir)
    environment = describe_environment(device, splits.checksum)
    started_at = now_utc()
    splits = splits.to(device)
    with _deterministic(device):
        models, run_epoch = _models_and_runner(specs, splits, device, data_dir=data_dir, measures=measures)
        signals = [measure_signal(model, training_set(splits, run)[0]) if "signal" in measures
                   and spec.pipeline != "original" else None for run, model in zip(specs, models, strict=True)]
        epochs, steps, diverged_at_epoch = _train_epochs(specs, variant, models, run_epoch, splits, device,
                                                         on_epoch, precise="precise" in measures,
                                                         own=_own_measures(measures))
        return _records(specs, variant, models, run_epoch, splits, epochs, steps, diverged_at_epoch, signals,
                        study=study, environment=environment, started_at=started_at, executor=executor)


def _own_measures(measures: Collection[str]) -> list:
    """The plugins' measures among `measures` (bnsuite.registry.register_measure), in name order; SpecError for a
    name no plugin of this process registered."""
    own = []
    for name in sorted(set(measures) - set(MEASUREMENTS)):
        definition = measure_definition(name)
        if definition is None:
            raise SpecError(f"measure {name!r} is asked for but not registered in this process: load the plugin that "
                            "registers it (--bn-plugin MODULE, or its package's entry point)")
        own.append(definition)
    return own


def _measured(own: list, model: torch.nn.Module, data: MeasureData, epoch: int) -> tuple[tuple[str, float], ...]:
    """Each of the plugins' measures `own` of `model` (a copy, in eval mode, for each) at the end of `epoch`."""
    values = []
    for definition in own:
        value = definition.function(copy.deepcopy(model).eval(), data)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SpecError(f"measure {definition.name!r} ({definition.source}) gave {value!r} for "
                            f"{data.spec.case_id} at epoch {epoch}; a measure returns a finite number")
        values.append((definition.name, float(value)))
    return tuple(values)


def _models_and_runner(specs: list[RunSpec], splits, device: torch.device, *, data_dir: Path | str | None,
                       measures: Collection[str]):
    """Each run's model from its own seed's init (as when it trains alone), and the pipeline's epoch runner over
    all of them, with each run's shuffle and the generator its dropout masks and noise draw from."""
    models, shuffles, dropouts = [], [], []
    info = DATASETS[specs[0].dataset]
    for run in specs:
        torch.manual_seed(run.seed)  # the model's default init draws from the global generator
        models.append(build_model(run.variant, run.init_scale, run.network, info.image_shape, info.classes).to(device))
        shuffles.append(torch.Generator().manual_seed(run.seed))
        dropouts.append(_generator_after_init(device))
    run_epoch = EPOCH_RUNNERS[specs[0].pipeline](specs, models, shuffles, splits, dropout_generators=dropouts,
                                                 data_dir=data_dir, measures=frozenset(measures))
    return models, run_epoch


def _train_epochs(specs: list[RunSpec], variant: Variant, models, run_epoch, splits, device: torch.device,
                  on_epoch: EpochCallback | None, *, precise: bool = False, own: list = (),
                  ) -> tuple[list[list[EpochRecord]], list[int], list[int | None]]:
    """The group's epochs, each run's evaluated at every epoch end (and, with `precise`, with precise population
    statistics too where the variant keeps running estimates): per run its epoch records, its steps and the
    epoch it diverged at (None if it did not). A run that diverges stops being recorded; the others go on, and
    training stops when none is left."""
    spec = specs[0]
    epochs: list[list[EpochRecord]] = [[] for _ in specs]
    steps = [0 for _ in specs]
    diverged_at_epoch: list[int | None] = [None for _ in specs]
    for epoch in range(1, spec.epochs + 1):
        _synchronize(device)
        started = time.perf_counter()
        batch_losses, correct, steps_taken = run_epoch()
        _synchronize(device)
        epoch_time = (time.perf_counter() - started) / len(specs)  # each run's share of the computation

        for index in range(len(specs)):
            if diverged_at_epoch[index] is None:
                steps[index] += steps_taken
                if has_diverged(batch_losses[index]):
                    diverged_at_epoch[index] = epoch
        live = [index for index, diverged in enumerate(diverged_at_epoch) if diverged is None]
        if not live:
            break
        validations = evaluate_all(run_epoch, models, splits.validation_images, splits.validation_labels,
                                   only=live)
        tests = evaluate_all(run_epoch, models, splits.test_images, splits.test_labels, only=live)
        held_out = ((splits.validation_images, splits.validation_labels) if spec.held_out == "validation"
                    else (splits.test_images, splits.test_labels))
        with_batch_statistics = evaluate_all(run_epoch, models, *held_out, batch_statistics=spec.batch_size,
                                             only=live) if variant.batch_statistics else None
        training = training_set(splits, spec)
        with_precise_statistics = precise_accuracies(
            models, training, held_out, batch_size=spec.batch_size, only=live, runner=run_epoch,
        ) if precise and variant.batch_statistics and is_precise_checkpoint(epoch, spec.epochs) else None
        for index in live:
            run, validation, test = specs[index], validations[index], tests[index]
            record = EpochRecord(
                epoch=epoch,
                train_loss=batch_losses[index].mean().item(),
                train_accuracy=100.0 * correct[index].item() / run.train_size,
                validation_loss=validation[0],
                validation_accuracy=validation[1],
                test_loss=test[0],
                test_accuracy=test[1],
                epoch_time_s=epoch_time,
                batch_statistics_accuracy=with_batch_statistics[index][1] if with_batch_statistics else None,
                precise_accuracy=with_precise_statistics[index] if with_precise_statistics else None,
                measured=_measured(own, models[index], MeasureData(*training, *held_out, run), epoch) if own else (),
            )
            epochs[index].append(record)
            if on_epoch is not None:
                on_epoch(run, record)
    return epochs, steps, diverged_at_epoch


def _records(specs: list[RunSpec], variant: Variant, models, run_epoch, splits, epochs: list[list[EpochRecord]],
             steps: list[int], diverged_at_epoch: list[int | None], signals: list, *, study: StudySpec | None,
             environment, started_at: str, executor: str) -> list[RunRecord]:
    """Each run's record: its epochs, its final model's figures on the test and training images, its probe and
    landscape traces, its signal at initialization, the group it trained with and the step that trained it."""
    spec = specs[0]
    records = []
    prober = getattr(run_epoch, "prober", None)  # the original pipeline is not probed
    traces = prober.traces() if prober is not None else [None] * len(specs)
    landscaper = getattr(run_epoch, "landscaper", None)
    landscapes = landscaper.traces() if landscaper is not None else [None] * len(specs)
    finished_runs = [index for index, diverged in enumerate(diverged_at_epoch) if diverged is None]
    on_training_set = evaluate_all(run_epoch, models, *training_set(splits, spec), only=finished_runs)
    finished = zip(specs, models, epochs, steps, diverged_at_epoch, traces, landscapes, on_training_set, signals,
                   strict=True)
    for run, model, run_epochs, run_steps, diverged, trace, landscape, train_eval, signal in finished:
        train_loss_eval, train_accuracy_eval = train_eval
        if diverged is None and run_epochs:  # the model the last epoch evaluated: its figures, not a rerun
            test_loss, test_accuracy = run_epochs[-1].test_loss, run_epochs[-1].test_accuracy
        else:  # a diverged run kept training with its group after its last recorded epoch: as a module
            test_loss, test_accuracy = evaluate(model, splits.test_images, splits.test_labels)
            train_loss_eval, train_accuracy_eval = evaluate(model, *training_set(splits, run))
        records.append(RunRecord(
            spec=run,
            variant=variant,
            study=study,
            runs_trained_together=len(specs),
            trained_with=tuple(other.case_id for other in specs),
            epochs=tuple(run_epochs),
            test_loss=finite_or_none(test_loss),
            test_accuracy=test_accuracy,
            final_train_loss_eval=finite_or_none(train_loss_eval),
            final_train_accuracy_eval=train_accuracy_eval,
            train_time_s=sum(epoch.epoch_time_s for epoch in run_epochs),
            steps=run_steps,
            diverged_at_epoch=diverged,
            environment=environment,
            started_at=started_at,
            executor=executor,
            activations=None if diverged else trace,  # past divergence the probe measures a broken model
            training_step=run_epoch.step_name,
            landscape=None if diverged else landscape,
            signal=signal,  # measured before training: a later divergence does not change it
            dataset=None if DATASETS[run.dataset].builtin else DATASETS[run.dataset],
            network=None if NETWORKS[run.network].builtin else NETWORKS[run.network],
        ))
    return records


def _generator_after_init(device: torch.device) -> torch.Generator:
    """A generator where torch's own stands after a model's init: dropout masks drawn from it are the ones
    F.dropout would draw for that run trained alone through autograd."""
    generator = torch.Generator(device=device)
    generator.set_state(torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state())
    return generator


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """torch's deterministic algorithms on a GPU for the duration of a training; a CPU needs nothing."""
    if device.type != "cuda":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _check_one_group(specs: list[RunSpec]) -> None:
    if not specs:
        raise ValueError("train_seeds needs at least one RunSpec")
    shared = {dataclasses.replace(spec, seed=0, lr=0.01, init_scale=1.0) for spec in specs}
    if len(shared) != 1:
        raise ValueError("train_seeds trains runs that differ only in seed, learning rate or init scale; "
                         "these differ in more")
    if len(set(specs)) != len(specs):
        raise ValueError("train_seeds was given the same run twice; give each run once")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
