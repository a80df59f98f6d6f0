"""The roofline's counts and arithmetic (bnsuite.speed); the rates themselves are measured in benchmarks/."""

import pytest

from bnsuite.training.models import build_model, parameter_count
from bnsuite.training.speed import Roofline, StepTraffic, activation_widths


def test_activation_widths_count_every_forward_output_and_backward_gradient_per_image():
    # plain: fc1, fc2, fc3 outputs + log-probabilities; gradients at the logits and at fc2's and fc3's inputs.
    assert activation_widths(build_model("plain")) == (256 + 128 + 10 + 10, 10 + 256 + 128)
    # bn adds each BN layer's output and its input gradient.
    assert activation_widths(build_model("bn")) == (404 + 256 + 128, 394 + 256 + 128)


def test_step_traffic_reads_and_writes_each_parameter_gradient_and_momentum_once_a_step():
    one = StepTraffic.of("plain", 64, 1)
    parameters = parameter_count(build_model("plain"))
    assert one.bytes_per_step == 6 * 4 * parameters + 4 * 64 * (784 + 2 * (404 + 394))
    assert one.working_set == 3 * 4 * parameters + 4 * 64 * (784 + 2 * (404 + 394))
    fifteen = StepTraffic.of("plain", 64, 15)
    assert (fifteen.bytes_per_step, fifteen.working_set) == (15 * one.bytes_per_step, 15 * one.working_set)
    assert StepTraffic.of("bn", 64, 1).bytes_per_step > one.bytes_per_step


def test_step_traffic_counts_the_dataset_s_images_and_classes():
    """A ConvNet on 3x32x32 images of 4 classes reads 3,072 values an image and writes 4 logits, not MNIST's."""
    mnist = StepTraffic.of("bn", 64, 1, "cnn")
    colour = StepTraffic.of("bn", 64, 1, "cnn", (3, 32, 32), 4)
    model = build_model("bn", network="cnn", image_shape=(3, 32, 32), classes=4)
    forward, backward = activation_widths(model)
    assert colour.bytes_per_step == 6 * 4 * parameter_count(model) + 4 * 64 * (3 * 32 * 32 + 2 * (forward + backward))
    assert forward == 8 * 32 * 32 * 2 + 16 * 16 * 16 * 2 + (8 * 32 * 32 + 16 * 16 * 16) // 4 + 2 * 4
    assert colour.bytes_per_step > mnist.bytes_per_step


def test_the_roofline_bound_is_the_slower_of_compute_and_traffic():
    traffic = StepTraffic(bytes_per_step=100 * 10**6, working_set=50 * 10**6)
    # 1 GFLOP at 100 GFLOP/s: 10 ms; 100 MB at 20 GB/s: 5 ms -> compute bound; a 40 ms step is 0.25 of it.
    compute_bound = Roofline(flops_per_step=1e9, traffic=traffic, peak_flops=100e9, bandwidth=20e9, step_s=0.04)
    assert (compute_bound.limit, compute_bound.bound_s) == ("compute", pytest.approx(0.01))
    assert compute_bound.fraction_of_bound == pytest.approx(0.25) == compute_bound.fraction_of_peak
    # The same step at 5 GB/s: 20 ms of traffic bounds it; the fraction of peak does not move.
    traffic_bound = Roofline(flops_per_step=1e9, traffic=traffic, peak_flops=100e9, bandwidth=5e9, step_s=0.04)
    assert (traffic_bound.limit, traffic_bound.fraction_of_bound) == ("traffic", pytest.approx(0.5))
    assert traffic_bound.fraction_of_peak == pytest.approx(0.25)
    assert traffic_bound.info()["fraction_of_roofline"] == pytest.approx(0.5)


def test_step_matmuls_are_timed_at_the_step_s_shapes_one_gemm_per_model_and_layer(monkeypatch):
    import torch

    from bnsuite.training import speed

    calls = []
    for name in ("addmm", "mm"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *args, original=original, name=name, **kwargs: (
            calls.append((name, tuple(args[-2].shape), tuple(args[-1].shape))), original(*args, **kwargs))[1])
    assert speed.step_matmul_seconds(build_model("plain"), 64, 2, seconds=0.0) > 0
    first_step = calls[:len(calls) // 13]  # 3 warm-up steps, then 10 timed
    # Per model: 3 forward GEMMs, 3 weight gradients, 2 input gradients (the images need none).
    assert len(first_step) == 2 * (3 + 3 + 2)
    assert ("addmm", (64, 784), (784, 256)) in first_step and ("mm", (10, 64), (64, 128)) in first_step
    assert ("mm", (64, 256), (256, 784)) not in first_step  # no input gradient for the first layer


def test_the_most_reachable_fraction_is_the_bound_over_the_step_s_gemms_and_update_timed_alone():
    traffic = StepTraffic(bytes_per_step=100 * 10**6, working_set=50 * 10**6)
    # Compute bound 10 ms; GEMMs alone 12 ms and the update 4 ms: no step built of them beats 16 ms.
    roofline = Roofline(flops_per_step=1e9, traffic=traffic, peak_flops=100e9, bandwidth=20e9, step_s=0.04,
                        matmul_s=0.012, update_s=0.004)
    assert roofline.floor_s == pytest.approx(0.016)
    assert roofline.ceiling == pytest.approx(0.625) == roofline.info()["fraction_of_roofline_ceiling"]
    assert roofline.fraction_of_bound == pytest.approx(0.25)
    # Unmeasured terms give no ceiling rather than a made-up one; a floor under the bound caps it at 1.
    assert Roofline(flops_per_step=1e9, traffic=traffic, peak_flops=100e9, bandwidth=20e9, step_s=0.04,
                    matmul_s=0.012).ceiling is None
    assert Roofline(flops_per_step=1e9, traffic=traffic, peak_flops=100e9, bandwidth=20e9, step_s=0.04,
                    matmul_s=0.004, update_s=0.001).ceiling == 1.0


def test_the_update_is_timed_as_the_fast_step_runs_it_one_fused_call_over_every_model(monkeypatch):
    import torch

    from bnsuite.training import speed

    calls = []
    original = torch._fused_sgd_
    monkeypatch.setattr(torch, "_fused_sgd_", lambda *lists, **kwargs: (
        calls.append([len(tensors) for tensors in lists]), original(*lists, **kwargs))[1])
    assert speed.step_update_seconds("bn", 3, seconds=0.0) > 0
    # Each of 3 models: fc1-3 weight and bias, bn1-2 weight and bias, as parameters, gradients and momentum.
    assert calls[0] == [3 * 10] * 3 and len(calls) >= 1 + 10


def test_the_study_floor_sums_each_runs_step_roofline_over_what_it_trained():
    from pathlib import Path

    from bnsuite.core.records import load_records
    from bnsuite.training.speed import StudyFloor, training_flops_per_sample

    records = [r for r in load_records(Path(__file__).parents[1] / "results" / "reference" / "smoke")
               if r.spec.case_id in ("plain-bs64-seed0", "bn-bs64-seed0")]
    assert len(records) == 2
    sizes = []
    floor = StudyFloor.of(records, peak_flops=100e9, wall_time_s=40.0,
                          bandwidth=lambda nbytes: (sizes.append(nbytes), 20e9)[1])
    flops = [training_flops_per_sample(build_model(r.spec.variant)) * r.spec.train_size * r.spec.epochs
             for r in records]
    assert floor.gflop == pytest.approx(sum(flops) / 1e9)
    assert floor.compute_s == pytest.approx(sum(flops) / 100e9)
    traffic = [r.steps * StepTraffic.of(r.spec.variant, 64, r.runs_trained_together).bytes_per_step
               / r.runs_trained_together / 20e9 for r in records]
    assert floor.traffic_s == pytest.approx(sum(traffic))
    assert floor.floor_s == pytest.approx(sum(max(f / 100e9, t) for f, t in zip(flops, traffic, strict=True)))
    assert floor.train_ratio == pytest.approx(sum(r.train_time_s for r in records) / floor.floor_s)
    assert floor.wall_ratio == pytest.approx(40.0 / floor.floor_s)
    assert floor.run_epochs == sum(r.spec.epochs for r in records) and floor.runs == 2
    assert all(size & (size - 1) == 0 for size in sizes)  # bandwidth measured once per power-of-two working set
    assert "x the floor" in floor.describe() and floor.info()["floor_s"] == floor.floor_s
