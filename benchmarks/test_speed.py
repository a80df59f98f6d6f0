"""Speed of bnsuite's training path, measured side by side in one run.

- one training epoch through the original pipeline (torchvision Dataset +
  transforms + DataLoader), through the eager autograd step on tensor batches,
  through bnsuite's fast step on one run alone, and the study's way: the fast
  step with the study's seeds trained together (per run: the computation's
  time over the number of seeds), same batches and arithmetic, at batch 64:
  their ratios are the speed-ups;
- the study's way at batch 32, 64 and 128 against the machine's float32
  matmul peak measured here: achieved training FLOP/s / peak FLOP/s;
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
from bnsuite.train import resolve_device, train_seeds

MEASURED: dict = {}  # filled in file order: peak, original, one run alone (eager, fast), the study's way
ROUNDS = 3  # single CPU epochs vary by up to 1.7x here; the median of 3 steadies the ratios


def _median_epoch_time(benchmark, specs, data_dir, rounds):
    """Median over `rounds` of one epoch of `specs` trained together (training only), timed by the benchmark too."""
    times = []

    def one_epoch():
        records = train_seeds(specs, data_dir=data_dir)
        assert all(record.steps == record.spec.steps_per_epoch for record in records)
        times.append(sum(record.train_time_s for record in records))  # the runs' shares add up to the whole

    benchmark.pedantic(one_epoch, rounds=rounds, iterations=1)
    return statistics.median(times)


def _epoch_specs(study, variant, batch_size, pipeline, seeds=(0,)):
    return [RunSpec(dataset=study.dataset, variant=variant, batch_size=batch_size, epochs=1, validation_size=0,
                    train_subset=study.train_subset, pipeline=pipeline, seed=seed,
                    device="cpu" if pipeline == "original" else study.device) for seed in seeds]


def test_matmul_peak(benchmark, study, study_session):
    device = resolve_device(study.device)
    peak = benchmark.pedantic(matmul_peak_flops, args=(device,), rounds=1, iterations=1)
    MEASURED["peak"] = peak
    benchmark.extra_info.update({"device": str(device), "peak_gflops": peak / 1e9})
    study_session.progress(f"speed: float32 matmul peak on {device}: {peak / 1e9:.1f} GFLOP/s")


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_original_pipeline_epoch(benchmark, study, study_session, variant):
    specs = _epoch_specs(study, variant, 64, "original")
    epoch_s = _median_epoch_time(benchmark, specs, study_session.data_dir, rounds=1)  # 10x slower: 1 round
    MEASURED[("original", variant)] = epoch_s
    benchmark.extra_info.update({"epoch_s": epoch_s, "images": specs[0].train_size})
    study_session.progress(f"speed: original pipeline, {variant} bs64: {epoch_s:.2f} s per epoch")


@pytest.mark.parametrize("pipeline", ["eager", "fast"])
@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_one_run_tensor_epoch(benchmark, study, study_session, variant, pipeline):
    """One run alone on tensor batches at batch 64. Through autograd + torch.optim (eager): what the
    hand-written step saves. Through the fast step: what training the seeds together adds on top."""
    specs = _epoch_specs(study, variant, 64, pipeline)
    epoch_s = _median_epoch_time(benchmark, specs, study_session.data_dir, rounds=ROUNDS)
    MEASURED[(pipeline, variant)] = epoch_s
    benchmark.extra_info.update({"epoch_s": epoch_s, "images": specs[0].train_size})
    step = "eager autograd step" if pipeline == "eager" else "fast step"
    study_session.progress(f"speed: {step}, one run alone, {variant} bs64: {epoch_s:.2f} s per epoch (median)")


@pytest.mark.parametrize("batch_size", [32, 64, 128])
@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_fast_path_epoch(benchmark, study, study_session, variant, batch_size):
    """The study's training path: the study's seeds trained together; figures per run."""
    specs = _epoch_specs(study, variant, batch_size, "fast", seeds=study.seeds)
    # One round: each already trains len(seeds) runs, and the study's own matrix times 10 epochs of the same.
    together_s = _median_epoch_time(benchmark, specs, study_session.data_dir, rounds=1)
    epoch_s = together_s / len(specs)
    flops = training_flops_per_sample(build_model(variant)) * specs[0].train_size
    achieved = flops / epoch_s
    info = {"epoch_s_per_run": epoch_s, "runs_together": len(specs), "images": specs[0].train_size,
            "achieved_gflops": achieved / 1e9}
    line = (f"speed: fast path, {variant} bs{batch_size}, {len(specs)} seeds together: "
            f"{epoch_s:.2f} s per run-epoch")
    if "peak" in MEASURED:
        # The peak is measured again next to each figure and the best rate seen is kept: a peak caught
        # in a slow moment would flatter every fraction after it.
        MEASURED["peak"] = max(MEASURED["peak"], matmul_peak_flops(resolve_device(study.device), seconds=0.5))
        info["peak_gflops"] = MEASURED["peak"] / 1e9
        info["fraction_of_matmul_peak"] = achieved / MEASURED["peak"]
        line += f", {achieved / 1e9:.1f} GFLOP/s = {info['fraction_of_matmul_peak']:.2f} of matmul peak"
    for baseline, key, label in (("original", "speedup_vs_original", "the original pipeline"),
                                 ("eager", "speedup_vs_eager", "the eager autograd step"),
                                 ("fast", "speedup_vs_one_run_alone", "the fast step on one run alone")):
        if batch_size == 64 and (baseline, variant) in MEASURED:
            info[key] = MEASURED[(baseline, variant)] / epoch_s
            line += f", {info[key]:.2f}x {label}"
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
    step = FastStep([build_model(variant).to(device)], lr=0.01, momentum=0.9)
    images, labels = images.unsqueeze(0), labels.unsqueeze(0)  # one model: (1, B, ...)

    def hundred_steps():
        for _ in range(100):
            step(images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.pedantic(hundred_steps, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({"steps_per_round": 100, "batch_size": batch_size})
