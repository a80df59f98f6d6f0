"""Speed of bnsuite's training path, measured side by side in one run.

- one training epoch through the original pipeline (torchvision Dataset +
  transforms + DataLoader), through the eager autograd step on tensor batches,
  and through bnsuite's fast path, same batches and arithmetic, at batch 64:
  their ratios are the speed-ups;
- the same epoch at batch 32, 64 and 128 against the machine's float32 matmul
  peak measured here: achieved training FLOP/s / peak FLOP/s;
- the per-step cost of plain and bn (forward, backward, update) at each batch size.

Ratios, not absolute times, are the figures to compare: these machines are
shared and the same command can vary by 1.7x within minutes.
"""

import statistics

import pytest
import torch

from bnsuite.data import load_splits
from bnsuite.fastpath import FastStep
from bnsuite.models import build_model
from bnsuite.spec import RunSpec
from bnsuite.speed import matmul_peak_flops, training_flops_per_sample
from bnsuite.train import resolve_device, train

MEASURED: dict = {}  # filled in file order: peak, original epochs, eager epochs, fast epochs
ROUNDS = 3  # single CPU epochs vary by up to 1.7x here; the median of 3 steadies the ratios


def _median_epoch_time(benchmark, spec, data_dir, rounds):
    """Median training time (evaluation excluded) of `rounds` one-epoch runs of `spec`, timed by the benchmark too."""
    times = []

    def one_epoch():
        record = train(spec, data_dir=data_dir)
        assert record.steps == spec.steps_per_epoch
        times.append(record.train_time_s)

    benchmark.pedantic(one_epoch, rounds=rounds, iterations=1)
    return statistics.median(times)


def _epoch_spec(study, variant, batch_size, pipeline):
    return RunSpec(dataset=study.dataset, variant=variant, batch_size=batch_size, epochs=1, validation_size=0,
                   train_subset=study.train_subset, pipeline=pipeline,
                   device="cpu" if pipeline == "original" else study.device)


def test_matmul_peak(benchmark, study, study_session):
    device = resolve_device(study.device)
    peak = benchmark.pedantic(matmul_peak_flops, args=(device,), rounds=1, iterations=1)
    MEASURED["peak"] = peak
    benchmark.extra_info.update({"device": str(device), "peak_gflops": peak / 1e9})
    study_session.progress(f"speed: float32 matmul peak on {device}: {peak / 1e9:.1f} GFLOP/s")


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_original_pipeline_epoch(benchmark, study, study_session, variant):
    spec = _epoch_spec(study, variant, 64, "original")
    epoch_s = _median_epoch_time(benchmark, spec, study_session.data_dir, rounds=1)  # 10x slower: 1 round
    MEASURED[("original", variant)] = epoch_s
    benchmark.extra_info.update({"epoch_s": epoch_s, "images": spec.train_size})
    study_session.progress(f"speed: original pipeline, {variant} bs64: {epoch_s:.2f} s per epoch")


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_eager_autograd_epoch(benchmark, study, study_session, variant):
    """The same tensor batches through autograd + torch.optim: what the hand-written step saves."""
    spec = _epoch_spec(study, variant, 64, "eager")
    epoch_s = _median_epoch_time(benchmark, spec, study_session.data_dir, rounds=ROUNDS)
    MEASURED[("eager", variant)] = epoch_s
    benchmark.extra_info.update({"epoch_s": epoch_s, "images": spec.train_size})
    study_session.progress(f"speed: eager autograd step, {variant} bs64: {epoch_s:.2f} s per epoch (median)")


@pytest.mark.parametrize("batch_size", [32, 64, 128])
@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_fast_path_epoch(benchmark, study, study_session, variant, batch_size):
    spec = _epoch_spec(study, variant, batch_size, "fast")
    epoch_s = _median_epoch_time(benchmark, spec, study_session.data_dir, rounds=ROUNDS)
    flops = training_flops_per_sample(build_model(variant)) * spec.train_size
    achieved = flops / epoch_s
    info = {"epoch_s": epoch_s, "images": spec.train_size, "achieved_gflops": achieved / 1e9}
    line = f"speed: fast path, {variant} bs{batch_size}: {epoch_s:.2f} s per epoch (median)"
    if "peak" in MEASURED:
        info["fraction_of_matmul_peak"] = achieved / MEASURED["peak"]
        line += f", {achieved / 1e9:.1f} GFLOP/s = {info['fraction_of_matmul_peak']:.2f} of matmul peak"
    if batch_size == 64 and ("original", variant) in MEASURED:
        info["speedup_vs_original"] = MEASURED[("original", variant)] / epoch_s
        line += f", {info['speedup_vs_original']:.1f}x the original pipeline"
    if batch_size == 64 and ("eager", variant) in MEASURED:
        info["speedup_vs_eager"] = MEASURED[("eager", variant)] / epoch_s
        line += f", {info['speedup_vs_eager']:.2f}x the eager autograd step"
    benchmark.extra_info.update(info)
    study_session.progress(line)


@pytest.mark.parametrize("batch_size", [32, 64, 128])
@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_training_step_cost(benchmark, study, study_session, variant, batch_size):
    """One forward + backward + SGD update of the fast step on a fixed batch."""
    device = resolve_device(study.device)
    splits = load_splits(study.dataset, validation_size=0, data_dir=study_session.data_dir)
    images = splits.train_images[:batch_size].to(device)
    labels = splits.train_labels[:batch_size].to(device)
    torch.manual_seed(0)
    step = FastStep(build_model(variant).to(device), lr=0.01, momentum=0.9)

    def hundred_steps():
        for _ in range(100):
            step(images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.pedantic(hundred_steps, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({"steps_per_round": 100, "batch_size": batch_size})
