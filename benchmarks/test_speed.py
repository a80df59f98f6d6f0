"""Speed of bnsuite's training paths, measured side by side in one run.

- `test_training_paths_side_by_side`: one training epoch at batch 64 (on at
  most 10,000 images) through each path in turn, round after round: the original pipeline (torchvision
  Dataset + transforms + DataLoader), the eager autograd step on tensor
  batches, the ATen fast step with the seeds together (the fallback where the fused step cannot be built),
  the training step on one run alone, and the study's way (the training step, fused where it builds, with
  the study's seeds trained together; its time is per run).
  Same batches, same arithmetic. Each round gives a time ratio per path; the
  speed-up reported is the median of those ratios, so a slow moment of the
  machine hits both sides of a ratio rather than one figure;
- `test_fast_path_epoch`: the study's way at batch 32, 64 and 128, and a
  group of 8 runs at batch 64, against the machine's roofline
  measured here (bnsuite.speed): the fraction of the float32 matmul peak
  (achieved FLOP/s / peak FLOP/s) and the fraction of the roofline bound
  (the larger of the step's FLOPs at that peak and its least bytes at the
  copy bandwidth over its working set, divided by the step's time), and
  the most the step could reach: the bound over its GEMMs and its update,
  each timed alone as the step runs them (bnsuite.speed.step_floor_seconds);
- `test_network_paths_side_by_side`, `test_network_epoch`: the same for each network the session trains
  besides the MLP (the ConvNet with --bn-network cnn, a plugin's network): its original pipeline, the eager
  step (for the ConvNet in NCHW and in channels-last), and the study's way (its step, seeds together) side by
  side, and its roofline;
- `test_training_step_cost`: the per-step cost of plain and bn (forward,
  backward, update) at each batch size, through the step that trains;
- `test_own_layer_epoch`: a layer no fused step covers (`bn-scratch`, BN written
  out in Python, as a user's layer is) on the compiled step, its seeds together,
  beside the eager step and the fused step's bn, and its roofline fraction.

Ratios, not absolute times, are the figures to compare: these machines are
shared and the same command can vary by 1.7x within minutes. Every benchmark
names its kind in extra_info["bnsuite"], which is how bnsuite.report reads it.
"""

import dataclasses
import statistics

import pytest
import torch

from bnsuite.core.datasets import DATASETS
from bnsuite.core.networks import title
from bnsuite.core.spec import RunSpec
from bnsuite.training import fused
from bnsuite.training.data import load_splits
from bnsuite.training.fastpath import FastStep
from bnsuite.training.models import build_model
from bnsuite.training.speed import (
    MEMORY_BYTES,
    Roofline,
    StepTraffic,
    copy_bandwidth,
    matmul_peak_flops,
    step_floor_seconds,
    training_flops_per_sample,
)
from bnsuite.training.train import MAX_RUNS_TOGETHER, resolve_device, train_seeds

BANDWIDTH: dict[int, float] = {}  # working-set bytes -> the best copy bandwidth seen over it in this run, bytes/s
ROUNDS = 3  # rounds of the side-by-side comparison: the median of 3 ratios steadies it


def _rounds(study) -> int:
    """The side-by-side comparisons' rounds: ROUNDS, one in the smoke profile (which checks that every path runs and
    gives its ratio, in CI's minutes; a steady figure is the other profiles')."""
    return 1 if study.profile == "smoke" else ROUNDS
SWEEP_RUNS = MAX_RUNS_TOGETHER  # a sweep group: the most runs the ATen step trains as one computation
SWEEP_IMAGES = 20_000  # a third of an epoch: rates are what is measured
PATH_IMAGES = 10_000  # a sixth: the ratios are what is measured, and the original pipeline's rounds dominate


def _at_most(spec: RunSpec, images: int) -> RunSpec:
    return dataclasses.replace(spec, train_subset=images) if spec.train_size > images else spec


def _epoch_specs(study, variant, batch_size, pipeline, seeds=(0,)):
    return [RunSpec(dataset=study.dataset, variant=variant, batch_size=batch_size, epochs=1, validation_size=0,
                    train_subset=study.train_subset, pipeline=pipeline, seed=seed,
                    device="cpu" if pipeline == "original" else study.device) for seed in seeds]


def _epoch_time_per_run(specs, data_dir, *, aten: bool = False) -> float:
    """One epoch of `specs` trained together: each run's share of the training time (evaluation excluded); with
    `aten`, on the ATen fast step even where the fused one builds."""
    if aten:
        with fused.switched_off():
            return _epoch_time_per_run(specs, data_dir)
    records = train_seeds(specs, data_dir=data_dir)
    assert all(record.steps == record.spec.steps_per_epoch for record in records)
    return sum(record.train_time_s for record in records) / len(records)


def _best_rates(study_session, traffic: StepTraffic, device) -> float:
    """The matmul peak and the bandwidth over `traffic`'s working set, measured again next to a figure; the best
    rate seen in the run is kept (a peak caught in a slow moment would flatter every fraction after it): the
    session's peak is updated, the bandwidth returned."""
    study_session.peak_flops = max(study_session.peak_flops or 0.0, matmul_peak_flops(device, seconds=0.5))
    BANDWIDTH[traffic.working_set] = max(BANDWIDTH.get(traffic.working_set, 0.0),
                                         copy_bandwidth(traffic.working_set, device))
    return BANDWIDTH[traffic.working_set]


def test_matmul_peak(benchmark, study, study_session):
    device = resolve_device(study.device)
    peak = benchmark.pedantic(matmul_peak_flops, args=(device,), rounds=1, iterations=1)
    study_session.peak_flops = max(study_session.peak_flops or 0.0, peak)
    memory = copy_bandwidth(MEMORY_BYTES, device)
    benchmark.extra_info.update({"bnsuite": "matmul-peak", "device": str(device), "peak_gflops": peak / 1e9,
                                 "memory_bandwidth_gbps": memory / 1e9})
    study_session.progress(f"speed: float32 matmul peak on {device}: {peak / 1e9:.1f} GFLOP/s; copy bandwidth "
                           f"over {MEMORY_BYTES // 2**20} MiB: {memory / 1e9:.1f} GB/s")


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_training_paths_side_by_side(benchmark, study, study_session, variant):
    """Every path once per round, in an order that alternates between rounds; ratios taken within a round."""
    paths = {
        "original": _epoch_specs(study, variant, 64, "original"),
        "eager": _epoch_specs(study, variant, 64, "eager"),
        "aten": _epoch_specs(study, variant, 64, "fast", seeds=study.seeds),
        "one_run": _epoch_specs(study, variant, 64, "fast"),
        "study": _epoch_specs(study, variant, 64, "fast", seeds=study.seeds),
    }
    # A sixth of an epoch, the same images for every path: the ratios are the figures, and the original
    # pipeline's rounds would otherwise take most of the speed module's time.
    paths = {path: [_at_most(spec, PATH_IMAGES) for spec in specs] for path, specs in paths.items()}
    times: dict[str, list[float]] = {path: [] for path in paths}

    def one_round():
        order = list(paths) if len(times["study"]) % 2 == 0 else list(reversed(paths))
        for path in order:
            times[path].append(_epoch_time_per_run(paths[path], study_session.data_dir, aten=path == "aten"))

    rounds = _rounds(study)
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    ratios = {path: [alone / ours for alone, ours in zip(times[path], times["study"], strict=True)] for path in paths}
    speedup = {path: statistics.median(ratios[path]) for path in paths if path != "study"}
    benchmark.extra_info.update({
        "bnsuite": "paths", "variant": variant, "batch_size": 64, "rounds": rounds, "step": _step_name(variant),
        "runs_together": len(paths["study"]), "images": paths["study"][0].train_size,
        "epoch_s": {path: statistics.median(values) for path, values in times.items()},
        "epoch_s_by_round": times, "ratios_by_round": {p: r for p, r in ratios.items() if p != "study"},
        "speedup": speedup,
    })
    study_session.progress(
        f"speed: {variant} bs64, the study's way ({_step_name(variant)}, {len(paths['study'])} seeds together) vs: "
        + ", ".join(f"{path} {value:.2f}x" for path, value in speedup.items())
        + f" (median of {rounds} interleaved rounds)")




@pytest.mark.parametrize("batch_size, runs_together", [(32, None), (64, None), (128, None), (64, SWEEP_RUNS)],
                         ids=["bs32", "bs64", "bs128", "bs64-sweep"])
@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_fast_path_epoch(benchmark, study, study_session, variant, batch_size, runs_together):
    """The study's training path: the study's seeds trained together as a case does, and a sweep group of 8 runs
    at batch 64 (the most the ATen step trains as one computation; the fused step trains a sweep's case whole).

    The sweep's runs differ in seed only: a run's arithmetic does not depend on its learning rate, and runs
    that diverge (as a learning-rate sweep's do) would add their own slowdown to the figure.
    """
    # At most 20,000 images: a rate is what is measured, and full epochs would make these figures a third of the
    # speed module's time.
    runs_together = runs_together or len(study.seeds)
    specs = [_at_most(spec, SWEEP_IMAGES)
             for spec in _epoch_specs(study, variant, batch_size, "fast", seeds=tuple(range(runs_together)))]
    epoch_s = benchmark.pedantic(_epoch_time_per_run, args=(specs, study_session.data_dir), rounds=1, iterations=1)
    images, steps = specs[0].train_size, specs[0].steps_per_epoch
    achieved = training_flops_per_sample(build_model(variant)) * images / epoch_s
    device = resolve_device(study.device)
    traffic = StepTraffic.of(variant, batch_size, len(specs))
    bandwidth = _best_rates(study_session, traffic, device)
    # The average step of the epoch (its last batch is shorter): every run's images, the group's time.
    matmul_s, update_s = step_floor_seconds(variant, batch_size, len(specs), device)
    roofline = Roofline(flops_per_step=training_flops_per_sample(build_model(variant)) * images * len(specs) / steps,
                        traffic=traffic, peak_flops=study_session.peak_flops, bandwidth=bandwidth,
                        step_s=epoch_s * len(specs) / steps, matmul_s=matmul_s, update_s=update_s)
    info = {"bnsuite": "fraction", "variant": variant, "batch_size": batch_size, "runs_together": len(specs),
            "step": _step_name(variant),
            "images": images, "epoch_s_per_run": epoch_s, "achieved_gflops": achieved / 1e9,
            "peak_gflops": study_session.peak_flops / 1e9, "fraction_of_matmul_peak": roofline.fraction_of_peak,
            **roofline.info()}
    benchmark.extra_info.update(info)
    study_session.progress(
        f"speed: {_step_name(variant)}, {variant} bs{batch_size}, {len(specs)} seeds together: {epoch_s:.2f} s per "
        f"run-epoch of {images:,} images, "
        f"{achieved / 1e9:.1f} GFLOP/s = {info['fraction_of_matmul_peak']:.2f} of matmul peak, "
        f"{roofline.fraction_of_bound:.2f} of the roofline bound ({roofline.limit}: "
        f"{traffic.bytes_per_step / 1e6:.1f} MB a step at {bandwidth / 1e9:.1f} GB/s); its matmuls alone take "
        f"{roofline.matmul_s / roofline.step_s:.0%} of the step and its update "
        f"{roofline.update_s / roofline.step_s:.0%}: at most {roofline.ceiling:.2f} of the bound with these")


def _step_name(variant: str) -> str:
    """The step that trains `variant` on the MLP here, as records name it."""
    return fused.build().step_name if fused.supports(build_model(variant), 64) else FastStep.NAME


@pytest.mark.parametrize("batch_size", [32, 64, 128])
@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_training_step_cost(benchmark, study, study_session, variant, batch_size):
    """100 steps (forward + backward + SGD update) of one model on the same batch, through the step that trains
    (the fused step where it builds: a run of 100 batches, each the first `batch_size` training images)."""
    device = resolve_device(study.device)
    splits = load_splits(study.dataset, validation_size=0, data_dir=study_session.data_dir)
    torch.manual_seed(0)
    model = build_model(variant).to(device)
    images = splits.train_images[:batch_size].to(device).view(batch_size, -1)
    labels = splits.train_labels[:batch_size].to(device)
    if fused.supports(model, batch_size):
        step = fused.FusedStep([model], images.repeat(100, 1), labels.repeat(100), lr=0.01, momentum=0.9,
                               batch_size=batch_size)
        order = torch.arange(100 * batch_size).view(1, -1)
        losses, correct = torch.zeros(1, 100), torch.zeros(1, dtype=torch.int64)

        def hundred_steps():
            step.train(order, 0, 100, losses, correct)
    else:
        step = FastStep([model], lr=0.01, momentum=0.9)
        images, labels = images.unsqueeze(0), labels.unsqueeze(0)  # one model: (1, B, ...)

        def hundred_steps():
            for _ in range(100):
                step(images, labels)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    benchmark.pedantic(hundred_steps, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update({"bnsuite": "step-cost", "steps_per_round": 100, "batch_size": batch_size,
                                 "step": _step_name(variant) if device.type == "cpu" else FastStep.NAME})


# --- the session's other networks (the ConvNet, a user's): their figures are taken when the session trains them ---

NETWORK_IMAGES = 10_000  # a sixth of an epoch: a ConvNet epoch costs about 20 of the MLP's here


def _network_specs(study, network, variant, batch_size, pipeline, seeds=(0,)):
    return [_at_most(dataclasses.replace(spec, network=network), NETWORK_IMAGES)
            for spec in _epoch_specs(study, variant, batch_size, pipeline, seeds=seeds)]


def _network_model(study, network, variant):
    info = DATASETS[study.dataset]
    return build_model(variant, network=network, image_shape=info.image_shape, classes=info.classes)


def _epoch_and_step(specs, data_dir) -> tuple[float, str]:
    """One epoch of `specs` trained together: each run's share of the training time, and the step that trained."""
    records = train_seeds(specs, data_dir=data_dir)
    assert all(record.steps == record.spec.steps_per_epoch for record in records)
    return sum(record.train_time_s for record in records) / len(records), records[0].training_step


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_network_paths_side_by_side(benchmark, study, study_session, other_network, variant, monkeypatch):
    """Another network's epoch (bs64, 10,000 images) through the original pipeline (Dataset + DataLoader, eager
    autograd), the eager step on tensor batches (for a network that lays its feature maps out channels-last, as
    the ConvNet does, in NCHW too), and the study's way (its step, the study's seeds trained together; its time is
    per run); round after round, ratios within a round. `other_network`: each network the session trains besides
    the MLP (bnsuite.plugin)."""
    network = other_network
    from bnsuite.training import models

    paths = {"original": _network_specs(study, network, variant, 64, "original"),
             "eager": _network_specs(study, network, variant, 64, "eager"),
             "study": _network_specs(study, network, variant, 64, "fast", seeds=study.seeds)}
    if hasattr(_network_model(study, network, variant), "memory_format"):  # it follows models.CHANNELS_LAST
        paths = {"nchw": paths["eager"], **paths}
    times: dict[str, list[float]] = {path: [] for path in paths}
    steps: dict[str, str] = {}

    def one_round():
        order = list(paths) if len(times["study"]) % 2 == 0 else list(reversed(paths))
        for path in order:
            monkeypatch.setattr(models, "CHANNELS_LAST", path != "nchw")
            seconds, steps[path] = _epoch_and_step(paths[path], study_session.data_dir)
            times[path].append(seconds)
        monkeypatch.setattr(models, "CHANNELS_LAST", True)

    rounds = _rounds(study)
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    ratios = {path: [alone / ours for alone, ours in zip(times[path], times["study"], strict=True)] for path in paths}
    speedup = {path: statistics.median(ratios[path]) for path in paths if path != "study"}
    benchmark.extra_info.update({
        "bnsuite": "network-paths", "network": network, "network_title": title(network), "variant": variant,
        "batch_size": 64, "rounds": rounds, "step": steps["study"], "runs_together": len(paths["study"]),
        "images": paths["study"][0].train_size, "epoch_s": {p: statistics.median(v) for p, v in times.items()},
        "epoch_s_by_round": times, "ratios_by_round": {p: r for p, r in ratios.items() if p != "study"},
        "speedup": speedup})
    study_session.progress(
        f"speed: {title(network)}, {variant} bs64, the study's way ({steps['study']}, {len(paths['study'])} seeds "
        "together) vs: " + ", ".join(f"{path} {value:.2f}x" for path, value in speedup.items())
        + f" (median of {rounds} interleaved rounds)")


@pytest.mark.parametrize("batch_size", [32, 64, 128])
@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_network_epoch(benchmark, study, study_session, other_network, variant, batch_size):
    """Another network's training path, the study's seeds trained together as a case does, against the roofline:
    its matmul and convolution FLOPs at the matmul peak, its least traffic at the bandwidth over its working set,
    the fraction of the bound it reaches."""
    network = other_network
    specs = _network_specs(study, network, variant, batch_size, "fast", seeds=study.seeds)
    epoch_s, step = benchmark.pedantic(_epoch_and_step, args=(specs, study_session.data_dir), rounds=1,
                                       iterations=1)
    images, steps = specs[0].train_size, specs[0].steps_per_epoch
    flops = training_flops_per_sample(_network_model(study, network, variant))
    traffic = StepTraffic.of(variant, batch_size, len(specs), network)
    bandwidth = _best_rates(study_session, traffic, resolve_device(study.device))
    # The average step of the epoch for the whole group: every run's images, the group's time.
    roofline = Roofline(flops_per_step=flops * images * len(specs) / steps, traffic=traffic,
                        peak_flops=study_session.peak_flops, bandwidth=bandwidth,
                        step_s=epoch_s * len(specs) / steps)
    info = {"bnsuite": "network-fraction", "network": network, "network_title": title(network), "variant": variant,
            "batch_size": batch_size, "runs_together": len(specs), "step": step,
            "images": images, "epoch_s_per_run": epoch_s, "achieved_gflops": flops * images / epoch_s / 1e9,
            "peak_gflops": study_session.peak_flops / 1e9, "fraction_of_matmul_peak": roofline.fraction_of_peak,
            **roofline.info()}
    benchmark.extra_info.update(info)
    study_session.progress(
        f"speed: {title(network)}, {variant} bs{batch_size}, {step}, {len(specs)} seeds together: "
        f"{epoch_s:.2f} s per run for {images:,} images, "
        f"{info['achieved_gflops']:.1f} GFLOP/s = {roofline.fraction_of_peak:.3f} of matmul peak, "
        f"{roofline.fraction_of_bound:.3f} of the roofline bound ({roofline.limit}: {flops * images / steps / 1e9:.2f} "
        f"GFLOP and {traffic.bytes_per_step / 1e6:.1f} MB a step at {bandwidth / 1e9:.1f} GB/s)")


# --- a user's own layer: the compiled step (bnsuite.compiled) ---

OWN_LAYER = "bn-scratch"  # BN written out in Python, as a user's layer is: no fused or ATen step covers it


def test_own_layer_epoch(benchmark, study, study_session, monkeypatch):
    """A layer no fused step covers (`bn-scratch`, BatchNorm1d written out in Python), the study's seeds together on
    the compiled step (compiled however short the run), against the eager step one seed at a time and the fused
    step's `bn` on the same network and images: the second epoch of two over 10,000 images at batch 64 (the first
    pays the compilation), each path in turn, round after round; and its fraction of the roofline bound."""
    from bnsuite.training import compiled

    if resolve_device(study.device).type != "cpu" or compiled.unavailable() is not None:
        pytest.skip(f"the compiled step trains on a CPU where torch.compile works ({compiled.unavailable()})")
    monkeypatch.setenv(compiled.SWITCH_VARIABLE, "1")
    seeds = study.seeds
    paths = {"compiled": [dataclasses.replace(spec, epochs=2) for spec in _epoch_specs(study, OWN_LAYER, 64, "fast",
                                                                                        seeds=seeds)],
             "eager": [dataclasses.replace(spec, epochs=2) for spec in _epoch_specs(study, OWN_LAYER, 64, "eager",
                                                                                     seeds=seeds)],
             "fused bn": [dataclasses.replace(spec, epochs=2) for spec in _epoch_specs(study, "bn", 64, "fast",
                                                                                        seeds=seeds)]}
    paths = {path: [_at_most(spec, PATH_IMAGES) for spec in specs] for path, specs in paths.items()}
    times: dict[str, list[float]] = {path: [] for path in paths}
    steps: dict[str, str] = {}

    def one_round():
        order = list(paths) if len(times["compiled"]) % 2 == 0 else list(reversed(paths))
        for path in order:
            records = train_seeds(paths[path], data_dir=study_session.data_dir)
            times[path].append(sum(record.epochs[1].epoch_time_s for record in records) / len(records))
            steps[path] = records[0].training_step

    rounds = min(_rounds(study), 2)
    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    epoch_s = {path: statistics.median(values) for path, values in times.items()}
    images, batches = paths["compiled"][0].train_size, paths["compiled"][0].steps_per_epoch
    flops = training_flops_per_sample(build_model(OWN_LAYER))
    traffic = StepTraffic.of(OWN_LAYER, 64, len(seeds))
    bandwidth = _best_rates(study_session, traffic, resolve_device(study.device))
    roofline = Roofline(flops_per_step=flops * images * len(seeds) / batches, traffic=traffic,
                        peak_flops=study_session.peak_flops, bandwidth=bandwidth,
                        step_s=epoch_s["compiled"] * len(seeds) / batches)
    benchmark.extra_info.update({
        "bnsuite": "own-layer", "variant": OWN_LAYER, "batch_size": 64, "runs_together": len(seeds),
        "images": images, "rounds": rounds, "steps": steps, "epoch_s": epoch_s, "epoch_s_by_round": times,
        "speedup_vs_eager": epoch_s["eager"] / epoch_s["compiled"],
        "times_the_fused_bn": epoch_s["compiled"] / epoch_s["fused bn"],
        "fraction_of_matmul_peak": roofline.fraction_of_peak, **roofline.info()})
    study_session.progress(
        f"speed: a layer of one's own ({OWN_LAYER}), {steps['compiled']}, {len(seeds)} seeds together: "
        f"{epoch_s['compiled']:.3f} s per run-epoch of {images:,} images, "
        f"{epoch_s['eager'] / epoch_s['compiled']:.2f}x the eager step, "
        f"{epoch_s['compiled'] / epoch_s['fused bn']:.2f}x the fused step's bn; "
        f"{roofline.fraction_of_bound:.2f} of the roofline bound")
