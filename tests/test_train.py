import copy
import dataclasses
import math

import pytest
import torch

from bnsuite.core import registry
from bnsuite.core.records import RunRecord
from bnsuite.core.spec import PIPELINES, ClaimSettings, RunSpec, SpecError, Study
from bnsuite.training import epochs as epochs_module
from bnsuite.training import fastpath
from bnsuite.training import train as train_module
from bnsuite.training.epochs import TensorEpochs, epoch_order
from bnsuite.training.models import EagerStep, build_model
from bnsuite.training.train import EPOCH_RUNNERS, evaluate_with_batch_statistics, train, train_seeds

SMALL = dict(epochs=2, train_subset=2_000, validation_size=10_000)


def _results(record: RunRecord) -> tuple:
    """Everything a record says about what the run did, without when it ran and how long it took."""
    epochs = [dataclasses.replace(epoch, epoch_time_s=0.0) for epoch in record.epochs]
    return (record.spec, epochs, record.test_loss, record.test_accuracy, record.steps, record.diverged_at_epoch,
            record.trained_with)


def test_same_spec_gives_the_same_trajectory_bit_for_bit(mnist_dir):
    spec = RunSpec(variant="bn", seed=4, **SMALL)
    assert _results(train(spec, data_dir=mnist_dir)) == _results(train(spec, data_dir=mnist_dir))


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_the_same_group_trained_twice_gives_identical_records(mnist_dir, variant):
    specs = [RunSpec(variant=variant, seed=seed, **SMALL) for seed in (3, 1)]
    first, second = train_seeds(specs, data_dir=mnist_dir), train_seeds(specs, data_dir=mnist_dir)
    assert [_results(record) for record in first] == [_results(record) for record in second]


_FRESH_PROCESS = """
import json, sys, torch
if sys.argv[2] == "pool-first":
    torch.full((1 << 24,), 1.0) * 2.0  # torch's thread pool starts before bnsuite is imported,
    torch.full((512, 512), 1.0) @ torch.full((512, 512), 1.0)  # and BLAS runs on it
from bnsuite.spec import RunSpec
from bnsuite.train import train_seeds
specs = [RunSpec(variant="plain", seed=seed, lr=1.0, epochs=2, train_subset=2_000, validation_size=10_000)
         for seed in (0, 1)]
records = train_seeds(specs, data_dir=sys.argv[1])
print(json.dumps([[r.environment.denormals, r.train_losses, r.test_loss, r.test_accuracy] for r in records]))
"""


def _in_a_fresh_process(mnist_dir, *, keep=False, pool_first=False):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "BNSUITE_KEEP_DENORMALS": "1" if keep else "0"}
    run = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(mnist_dir), "pool-first" if pool_first else ""],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.processes
def test_subnormals_are_flushed_on_every_thread_and_collapsed_runs_stay_bit_for_bit_deterministic(mnist_dir):
    # Plain at lr 1 collapses: its values go subnormal, which flushing changes (and speeds up).
    first, second = _in_a_fresh_process(mnist_dir), _in_a_fresh_process(mnist_dir)
    assert first == second and {run[0] for run in first} == {"flushed"}
    kept = _in_a_fresh_process(mnist_dir, keep=True)
    assert {run[0] for run in kept} == {"kept"}
    if torch.get_num_threads() > 1:  # a pool started before bnsuite: its threads keep subnormals, and records say so
        assert {run[0] for run in _in_a_fresh_process(mnist_dir, pool_first=True)} == {"mixed"}


def test_different_seeds_give_different_trajectories(mnist_dir):
    zero = train(RunSpec(variant="plain", seed=0, **SMALL), data_dir=mnist_dir)
    one = train(RunSpec(variant="plain", seed=1, **SMALL), data_dir=mnist_dir)
    assert zero.train_losses != one.train_losses


# Ghost batches of 8 amplify float32 rounding enough that two correct implementations part by 1e-4 within an epoch:
# the ATen step, made of the eager step's own kernels, stays within 1e-5 of it. The fused step's products are other
# kernels (single-threaded MKL): on an AMD EPYC Zen 4, plain's trajectory here parts from the eager step's by 3e-4 in
# two epochs (1e-7 a step for nine steps, then growing about 2x a step: rounding amplified), so it is held to
# 1e-3 here, and its arithmetic against autograd's in float64 (tests/test_fused.py).
@pytest.mark.parametrize("variant, step", [
    *((variant, step) for variant in ("plain", "bn", "plain-dropout", "bn-dropout", "ln", "bn-ghost32")
      for step in ("fused", "aten")), ("bn-ghost8", "aten")])
def test_fast_step_matches_the_eager_autograd_step(mnist_dir, variant, step, request):
    if step == "aten":
        request.getfixturevalue("aten_fast_step")
    # Dropout variants too: the fast step draws each model's masks from where torch's RNG stood after its init,
    # exactly as F.dropout draws them in the eager step.
    fast = train(RunSpec(variant=variant, pipeline="fast", **SMALL), data_dir=mnist_dir)
    eager = train(RunSpec(variant=variant, pipeline="eager", **SMALL), data_dir=mnist_dir)
    tolerance = 1e-3 if step == "fused" else 1e-5
    for ours, reference in zip(fast.epochs, eager.epochs, strict=True):
        assert ours.train_loss == pytest.approx(reference.train_loss, rel=tolerance)
        assert ours.validation_loss == pytest.approx(reference.validation_loss, rel=max(tolerance, 1e-4))
    assert fast.test_accuracy == pytest.approx(eager.test_accuracy, abs=0.05)


@pytest.mark.parametrize("variant", ["bn-ghost2", "bn-ghost4", "ln"])
def test_fast_step_computes_the_eager_steps_arithmetic_in_float64(variant):
    # Statistics over 2 images divide by a standard deviation near sqrt(eps) wherever the two images are close,
    # which amplifies rounding about 30x a step here: two correct float32 implementations part within a few
    # steps (the trajectory test above covers g = 8 and 32). In float64, over 3 steps, the rounding stays far
    # below the tolerance: what is compared is the arithmetic, ragged last ghost batches included.
    torch.manual_seed(0)
    fast_model = build_model(variant).double()
    eager_model = copy.deepcopy(fast_model)
    fast = fastpath.FastStep([fast_model], lr=0.01, momentum=0.9)
    eager = EagerStep(eager_model, RunSpec(variant=variant, lr=0.01))
    generator = torch.Generator().manual_seed(1)
    for batch_size in (64, 66, 65):  # 66 and 65: uneven last ghost batches (65: a group of 3 for g = 2)
        images = torch.rand(1, batch_size, 784, generator=generator, dtype=torch.float64) * 2 - 1
        labels = torch.randint(0, 10, (1, batch_size), generator=generator)
        fast_losses, _ = fast(images, labels)
        eager_losses, _ = eager(images, labels)
        assert fast_losses.item() == pytest.approx(eager_losses.item(), rel=1e-9)
    eager_state = eager_model.state_dict()
    for name, value in fast_model.state_dict().items():
        torch.testing.assert_close(value, eager_state[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_tensor_batches_match_the_original_dataloader_pipeline(mnist_dir, variant):
    spec = dict(variant=variant, epochs=2, train_subset=1_000, validation_size=0, batch_size=64)
    ours = train(RunSpec(pipeline="fast", **spec), data_dir=mnist_dir)
    original = train(RunSpec(pipeline="original", **spec), data_dir=mnist_dir)
    assert ours.train_losses == pytest.approx(original.train_losses, rel=1e-6)
    # Different kernels (fused step vs autograd + torch.optim): a prediction near a tie may flip on some CPU.
    assert ours.test_accuracy == pytest.approx(original.test_accuracy, abs=0.05)


@pytest.mark.parametrize("variant", ["plain", "bn", "bn-dropout", "ln", "bn-ghost4"])
def test_seeds_trained_together_match_each_seed_trained_alone_bit_for_bit(mnist_dir, variant):
    # SGD amplifies any rounding difference within a few hundred steps, so only exact equality shows
    # that a run's result does not depend on the seeds it trained with. 40 steps per epoch, the last
    # batch partial (2,500 = 39 x 64 + 4).
    specs = [RunSpec(variant=variant, seed=seed, epochs=2, train_subset=2_500, validation_size=10_000)
             for seed in (0, 1, 2)]
    together = train_seeds(specs, data_dir=mnist_dir)
    assert [record.spec for record in together] == specs
    for ours, spec in zip(together, specs, strict=True):
        alone = train(spec, data_dir=mnist_dir)
        assert _results(ours)[:-1] == _results(alone)[:-1]
        assert (ours.trained_with, alone.trained_with) == (tuple(s.case_id for s in specs), (spec.case_id,))
        assert (ours.runs_trained_together, alone.runs_trained_together) == (3, 1)


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_a_sweep_of_learning_rates_and_init_scales_trains_each_run_as_it_trains_alone(mnist_dir, variant):
    base = dict(variant=variant, epochs=1, train_subset=1_000, validation_size=10_000)
    specs = [RunSpec(seed=seed, lr=lr, init_scale=scale, **base)
             for lr, scale in ((0.01, 1.0), (0.3, 1.0), (0.01, 3.0)) for seed in (0, 1)]
    together = train_seeds(specs, data_dir=mnist_dir)
    for ours, spec in zip(together, specs, strict=True):
        alone = train(spec, data_dir=mnist_dir)
        assert _results(ours)[:-1] == _results(alone)[:-1], spec.case_id
        assert ours.trained_with == tuple(run.case_id for run in specs)
    # Each run really has its own learning rate and scale: no two trajectories are the same.
    assert len({record.train_losses[0] for record in together}) == len(specs)


def test_a_group_larger_than_the_most_runs_together_trains_in_chunks_each_run_as_alone(mnist_dir, monkeypatch):
    specs = [RunSpec(variant="bn", seed=seed, lr=lr, epochs=1, train_subset=1_000, validation_size=10_000)
             for lr in (0.01, 0.3) for seed in (0, 1, 2)]
    whole = train_seeds(specs, data_dir=mnist_dir)
    monkeypatch.setenv(train_module.MAX_RUNS_TOGETHER_VARIABLE, "4")
    chunked = train_seeds(specs, data_dir=mnist_dir)
    assert [record.spec for record in chunked] == specs
    # 6 runs, at most 4 together: two chunks of 3, in the order given.
    assert [record.trained_with for record in chunked] == [tuple(s.case_id for s in specs[:3])] * 3 + [
        tuple(s.case_id for s in specs[3:])] * 3
    assert {record.runs_trained_together for record in chunked} == {3}
    assert [_results(record)[:-1] for record in chunked] == [_results(record)[:-1] for record in whole]


@pytest.mark.parametrize("value", ["0", "many", "-2"])
def test_a_bad_most_runs_together_is_refused_naming_the_variable(mnist_dir, monkeypatch, value):
    monkeypatch.setenv(train_module.MAX_RUNS_TOGETHER_VARIABLE, value)
    with pytest.raises(ValueError, match=f"BNSUITE_MAX_RUNS_TOGETHER='{value}' is not a number of runs"):
        train_seeds([RunSpec(variant="plain", epochs=1, train_subset=100)], data_dir=mnist_dir)


STACKS = ["ioffe-plain", "ioffe-bn", "deep-plain", "deep-bn", "bn-ema0.99"]  # the papers' networks and averages


@pytest.mark.parametrize("variant", STACKS)
def test_the_aten_step_trains_the_papers_stacks_as_autograd_does_in_float64(variant):
    """Where the fused step cannot be built, the papers' stacks (any depth, sigmoid or ReLU) and BN at another
    running-estimate momentum train on the ATen step: its hand-written backward is autograd's arithmetic."""
    torch.manual_seed(0)
    fast_model = build_model(variant).double()
    eager_model = copy.deepcopy(fast_model)
    assert fastpath.supports(fast_model)
    fast = fastpath.FastStep([fast_model], lr=0.05, momentum=0.9)
    eager = EagerStep(eager_model, RunSpec(variant=variant, lr=0.05))
    generator = torch.Generator().manual_seed(1)
    for batch_size in (64, 33, 64):
        images = torch.rand(1, batch_size, 784, generator=generator, dtype=torch.float64) * 2 - 1
        labels = torch.randint(0, 10, (1, batch_size), generator=generator)
        assert fast(images, labels)[0].item() == pytest.approx(eager(images, labels)[0].item(), rel=1e-9)
    eager_state = eager_model.state_dict()
    for name, value in fast_model.state_dict().items():
        torch.testing.assert_close(value, eager_state[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("variant", STACKS)
def test_a_stack_steps_the_same_on_the_aten_step_in_any_group(variant):
    """Groups of 1 and 3, a ragged batch of 33 included: every parameter and buffer equal (100 features a layer:
    batch norm once per model, SIDE_BY_SIDE_FEATURES)."""
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(3, 64 + 33, 784, generator=generator)
    labels = torch.randint(0, 10, (3, 64 + 33), generator=generator)
    steps = {size: fastpath.FastStep(_models(variant, range(size)), lr=0.05, momentum=0.9) for size in (1, 3)}
    for start, stop in ((0, 64), (64, 97)):
        losses = {size: step(images[:size, start:stop], labels[:size, start:stop])[0] for size, step in steps.items()}
        assert losses[1][0] == losses[3][0]
    alone, grouped = (step.models[0].state_dict() for step in steps.values())
    assert all(torch.equal(alone[name], grouped[name]) for name in alone)


def _models(variant, seeds):
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build_model(variant))
    return models


@pytest.mark.parametrize("variant", ["plain", "bn", "ln", "bn-ghost4"])
@pytest.mark.parametrize("batch_size", [2, 5, 33, 100, 128])
def test_a_model_steps_the_same_in_any_group_at_any_batch_size(variant, batch_size):
    """Groups of 1, 2 and 5 on random data, ragged batch sizes included: every parameter and buffer equal."""
    generator = torch.Generator().manual_seed(batch_size)
    images = torch.randn(5, 4 * batch_size, 784, generator=generator)
    labels = torch.randint(0, 10, (5, 4 * batch_size), generator=generator)
    steps = {size: fastpath.FastStep(_models(variant, range(size)), lr=0.05, momentum=0.9) for size in (1, 2, 5)}
    for start in range(0, 4 * batch_size, batch_size):
        losses = {size: step(images[:size, start:start + batch_size], labels[:size, start:start + batch_size])[0]
                  for size, step in steps.items()}
        assert losses[1][0] == losses[2][0] == losses[5][0]
        assert torch.equal(losses[2], losses[5][:2])
    alone, *grouped = (step.models[0].state_dict() for step in steps.values())
    for state in grouped:
        assert all(torch.equal(alone[name], state[name]) for name in alone)


@pytest.mark.parametrize("variant", ["plain", "bn", "bn-dropout", "ln", "bn-ghost4"])
def test_the_fast_step_allocates_its_workspace_once_per_batch_size(variant):
    generator = torch.Generator().manual_seed(0)
    step = fastpath.FastStep(_models(variant, range(2)), lr=0.05, momentum=0.9,
                             dropout_generators=[torch.Generator().manual_seed(seed) for seed in range(2)])
    images = torch.randn(2, 64, 784, generator=generator)
    labels = torch.randint(0, 10, (2, 64), generator=generator)
    pointers = [step(images, labels)[1].data_ptr() for _ in range(2)]
    blocks = len(step.workspace)
    assert pointers[0] == pointers[1] and blocks >= 8
    step(images[:, :40], labels[:, :40])  # an epoch's short last batch: blocks of its own, kept for the next epoch
    assert len(step.workspace) == 2 * blocks
    assert step(images, labels)[1].data_ptr() == pointers[0]


def test_a_model_s_block_of_each_activation_starts_on_a_cache_line():
    # 4 images x 10 logits = 160 bytes: unpadded, the second model's logits would start mid-line.
    blocks = fastpath._per_model_empty(3, 4, 10, like=torch.empty(0))
    assert [block.data_ptr() % fastpath.ALIGNMENT for block in blocks.each] == [0, 0, 0]
    assert all(block.is_contiguous() for block in blocks.each)


def test_every_pipeline_has_one_epoch_runner():
    assert set(EPOCH_RUNNERS) == set(PIPELINES)


def test_seeds_trained_together_record_each_run_s_share_of_the_time(mnist_dir):
    records = train_seeds([RunSpec(variant="bn", seed=seed, **SMALL) for seed in (5, 6)], data_dir=mnist_dir)
    assert records[0].epochs[0].epoch_time_s == records[1].epochs[0].epoch_time_s > 0
    assert records[0].train_losses != records[1].train_losses


def test_runs_without_a_batched_step_train_one_after_another(mnist_dir):
    specs = [RunSpec(variant="bn-scratch", seed=seed, epochs=1, train_subset=1_000) for seed in (0, 1)]
    records = train_seeds(specs, data_dir=mnist_dir)
    assert [r.runs_trained_together for r in records] == [1, 1]
    assert records[0].train_losses == train(specs[0], data_dir=mnist_dir).train_losses


@pytest.mark.parametrize("seeds, change, message", [
    ((0, 1), dict(batch_size=128), "differ only in seed, learning rate or init scale"),
    ((0, 1), dict(epochs=3), "differ only in seed, learning rate or init scale"),
    ((0, 0), {}, "same run twice"),
    ((), {}, "at least one RunSpec"),
])
def test_train_seeds_refuses_runs_that_are_not_one_group(seeds, change, message):
    specs = [RunSpec(seed=seed, **SMALL) for seed in seeds]
    if change:
        specs[-1] = RunSpec(seed=seeds[-1], **{**SMALL, **change})
    with pytest.raises(ValueError, match=message):
        train_seeds(specs)


def test_shuffle_draws_as_dataloader_does_epoch_after_epoch():
    loader = torch.utils.data.DataLoader(range(10), batch_size=10, shuffle=True,
                                         generator=torch.Generator().manual_seed(7))
    ours = torch.Generator().manual_seed(7)
    for _ in range(3):  # each epoch consumed in full, as a training loop does
        assert [i for batch in loader for i in batch.tolist()] == epoch_order(10, ours).tolist()


def test_last_partial_batch_is_kept_and_steps_are_counted(mnist_dir):
    record = train(RunSpec(variant="plain", batch_size=64, epochs=2, train_subset=1_000), data_dir=mnist_dir)
    assert record.steps == 2 * 16  # 15 full batches and one of 40 images, per epoch


class _DroppingTheLastBatch(TensorEpochs):
    """A faulty loop: trains on the whole batches only."""

    def __init__(self, specs, *args, **kwargs):
        super().__init__(specs, *args, **kwargs)
        self.spec = dataclasses.replace(self.spec, train_subset=self.spec.train_size // self.spec.batch_size
                                        * self.spec.batch_size)


def test_steps_are_what_the_loop_took_so_a_dropped_batch_shows(mnist_dir, monkeypatch):
    monkeypatch.setitem(EPOCH_RUNNERS, "fast", _DroppingTheLastBatch)
    spec = RunSpec(variant="plain", batch_size=64, epochs=2, train_subset=1_000)
    assert train(spec, data_dir=mnist_dir).steps == 2 * 15 != spec.steps_per_epoch * spec.epochs


def test_seed_protocol_run_has_no_validation_but_reports_test_per_epoch(mnist_dir):
    record = train(RunSpec(variant="plain", epochs=1, train_subset=1_000, validation_size=0), data_dir=mnist_dir)
    assert record.epochs[0].validation_loss is None
    assert 0 < record.epochs[0].test_accuracy <= 100


def test_a_loss_that_blows_up_is_recorded_as_diverged_not_raised(mnist_dir):
    record = train(RunSpec(variant="plain", lr=5.0, epochs=3, train_subset=2_000), data_dir=mnist_dir)
    assert record.diverged and record.diverged_at_epoch == 1
    assert record.epochs == ()
    assert math.isinf(record.final_train_loss)
    RunRecord.from_json(record.to_json())  # still a valid, storable record


def test_a_run_that_diverges_stops_counting_steps_at_that_epoch(mnist_dir):
    record = train(RunSpec(variant="plain", lr=5.0, epochs=3, train_subset=2_000), data_dir=mnist_dir)
    assert record.steps == RunSpec(train_subset=2_000).steps_per_epoch  # the diverged epoch ran in full


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_same_group_is_identical_and_a_run_alone_agrees_to_rounding(mnist_dir):
    specs = [RunSpec(variant="bn", seed=seed, device="cuda", **SMALL) for seed in (0, 1, 2)]
    first, second = train_seeds(specs, data_dir=mnist_dir), train_seeds(specs, data_dir=mnist_dir)
    assert [_results(record) for record in first] == [_results(record) for record in second]
    alone = train(specs[0], data_dir=mnist_dir)
    # Rounding differences grow through SGD; after the first epoch's 20 steps they stay near float precision.
    assert alone.epochs[0].train_loss == pytest.approx(first[0].epochs[0].train_loss, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["plain", "bn", "bn-dropout", "ln", "bn-ghost4"])
def test_on_a_gpu_the_captured_step_trains_exactly_as_the_uncaptured_one(variant, mnist_dir, monkeypatch):
    specs = [RunSpec(variant=variant, seed=seed, device="cuda", batch_size=128, **SMALL) for seed in (0, 1)]
    captured = train_seeds(specs, data_dir=mnist_dir)  # 15 full steps and one short one per epoch
    monkeypatch.setattr(epochs_module, "CUDA_GRAPHS", False)
    uncaptured = train_seeds(specs, data_dir=mnist_dir)
    assert [_results(record) for record in captured] == [_results(record) for record in uncaptured]


def test_cuda_turns_deterministic_algorithms_on_only_while_it_trains():
    before = torch.are_deterministic_algorithms_enabled()
    with train_module._deterministic(torch.device("cuda")):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    with train_module._deterministic(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled() == before


def test_record_carries_timings_and_environment(mnist_dir):
    record = train(RunSpec(variant="bn", **SMALL), data_dir=mnist_dir)
    assert record.train_time_s == pytest.approx(sum(e.epoch_time_s for e in record.epochs))
    assert record.environment.device == "cpu"
    assert record.environment.torch_version == torch.__version__
    assert len(record.environment.dataset_checksum) == 32


@pytest.mark.parametrize("fields, message", [
    (dict(batch_size=0), "batch size must be at least 1"),
    (dict(batch_size=-3), "batch size must be at least 1"),
    (dict(batch_size="64"), "batch size must be a whole number"),
    (dict(batch_size=70_000), "larger than the training set"),
    (dict(epochs=0), "epochs must be at least 1"),
    (dict(epochs=-1), "epochs must be at least 1"),
    (dict(lr=0.0), "learning rate must be a finite number > 0"),
    (dict(lr=-0.1), "learning rate must be a finite number > 0"),
    (dict(lr=float("nan")), "learning rate must be a finite number > 0"),
    (dict(lr=float("inf")), "learning rate must be a finite number > 0"),
    (dict(dataset="svhn"), "unknown dataset 'svhn'"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(variant="my model"), "variant name 'my model' must be letters, digits"),
])
def test_a_spec_that_cannot_run_is_refused_with_what_to_change(fields, message):
    with pytest.raises(SpecError, match=message):
        RunSpec(**fields)


@pytest.mark.parametrize(("fields", "message"), [
    (dict(variant="resnet"), "unknown variant 'resnet'.*--bn-plugin MODULE"),
    (dict(variant="bn", train_subset=129, batch_size=64), "single image"),
    (dict(variant="bn-ghost32", batch_size=48), "does not split into ghost batches of 32"),
])
def test_a_run_its_variant_cannot_train_is_refused_before_training_with_what_to_change(fields, message, mnist_dir):
    with pytest.raises(SpecError, match=message):
        registry.checked(RunSpec(**fields))
    with pytest.raises(SpecError, match=message):
        train(RunSpec(**fields), data_dir=mnist_dir)


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_probing_the_activations_changes_nothing_in_training(variant, mnist_dir, monkeypatch):
    specs = [RunSpec(variant=variant, seed=seed, batch_size=16, **SMALL) for seed in (0, 1)]
    probed = train_seeds(specs, data_dir=mnist_dir)
    monkeypatch.setattr(epochs_module, "PROBES", False)
    unprobed = train_seeds(specs, data_dir=mnist_dir)
    assert [_results(record) for record in probed] == [_results(record) for record in unprobed]
    assert all(record.activations is None for record in unprobed)
    # 125 steps an epoch: before training, every 100 steps, and every epoch end.
    assert probed[0].activations.steps == (0, 100, 125, 200, 250)
    assert probed[0].activations.values != probed[1].activations.values  # each run probed on its own model


@pytest.mark.parametrize("variant", ["plain", "bn", "bn-scratch"])  # the fast step (seeds together) and the eager
def test_measuring_the_landscape_changes_nothing_in_training(variant, mnist_dir):
    specs = [RunSpec(variant=variant, seed=seed, batch_size=16, **SMALL) for seed in (0, 1)]
    measured = train_seeds(specs, data_dir=mnist_dir, measures=("landscape",))
    unmeasured = train_seeds(specs, data_dir=mnist_dir)  # no study asks for it
    assert [_results(record) for record in measured] == [_results(record) for record in unmeasured]
    assert [r.activations for r in measured] == [r.activations for r in unmeasured]
    assert all(record.landscape is None for record in unmeasured)
    trace = measured[0].landscape
    assert len(trace.steps) == 20 and trace.steps[0] == 0 and trace.ics_layers == ("fc2", "fc3")
    assert trace.ics != measured[1].landscape.ics  # each run measured on its own model


def test_only_the_runs_of_a_study_that_asks_measure_the_landscape_shared_runs_included(mnist_dir):
    settings = dict(profile="smoke", seeds=(0,), train_subset=512, validation_size=10_000,
                    claims=ClaimSettings(target_loss=0.5, trained_accuracy=50.0))
    spec = registry.study_spec(**settings, studies=(
        Study("batch", variants=("plain", "bn"), batch_sizes=(64,), epochs=1),
        Study("mine", variants=("bn",), batch_sizes=(64,), epochs=1, measures=("landscape",))))
    groups = {group[0].variant: group for group in spec.groups()}
    assert list(groups) == ["plain", "bn"]  # bn's runs are the batch study's, shared with "mine"
    assert (spec.measures(groups["plain"]), spec.measures(groups["bn"])) == (frozenset(), {"landscape"})
    plain, bn = (train_seeds(groups[name], data_dir=mnist_dir, study=spec)[0] for name in ("plain", "bn"))
    assert plain.landscape is None and bn.landscape is not None and bn.landscape.steps[0] == 0


def test_a_study_asking_for_a_measurement_nobody_registered_is_refused_with_what_it_can_measure():
    spec = registry.study_spec(profile="test", seeds=(0,), claims=ClaimSettings(target_loss=0.5), studies=(
        Study("mine", variants=("bn",), batch_sizes=(64,), epochs=1, measures=("hessian",)),))
    with pytest.raises(SpecError, match="asks to measure 'hessian'.*can measure: landscape, signal, precise"):
        registry.check_measures(spec)
    with pytest.raises(SpecError, match="a measure's name is letters"):
        Study("mine", variants=("bn",), batch_sizes=(64,), epochs=1, measures=("two words",))


def test_records_say_which_step_trained_them_and_uncovered_variants_fall_back_to_the_eager_step(mnist_dir,
                                                                                                 aten_fast_step):
    for variant, step in (("bn-scratch", "eager"), ("bn-ghost4", "fast"), ("ln", "fast"), ("bn", "fast")):
        records = train_seeds([RunSpec(variant=variant, seed=seed, batch_size=32, **SMALL) for seed in (0, 1)],
                              data_dir=mnist_dir)
        assert [record.training_step for record in records] == [step, step]
        assert [record.runs_trained_together for record in records] == ([1, 1] if step == "eager" else [2, 2])
    assert train(RunSpec(variant="bn", pipeline="eager", batch_size=32, **SMALL),
                 data_dir=mnist_dir).training_step == "eager"


def test_batch_statistics_accuracy_normalizes_each_batch_by_itself_and_touches_nothing(mnist_dir):
    torch.manual_seed(0)
    images, labels = torch.randn(70, 1, 28, 28), torch.randint(0, 10, (70,))
    for variant in ("bn", "bn-ghost4", "bn-dropout"):
        model = build_model(variant)
        model.eval()
        before = {name: buffer.clone() for name, buffer in model.named_buffers()}
        # Batches of 32, 32 and 6 images, each normalized by itself, as a training step would (dropout off).
        hits = 0
        for start, end in ((0, 32), (32, 64), (64, 70)):
            probe = copy.deepcopy(model).train()
            if getattr(probe, "dropout", None) is not None:
                probe.dropout.p = 0.0
            hits += int((probe(images[start:end]).argmax(1) == labels[start:end]).sum())
        assert evaluate_with_batch_statistics(model, images, labels, 32) == pytest.approx(100.0 * hits / 70)
        assert not model.training  # modes restored
        assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())
    # A last batch of one image joins the one before.
    assert evaluate_with_batch_statistics(build_model("bn"), images[:65], labels[:65], 32) is not None


def test_every_bn_epoch_records_its_accuracy_with_batch_statistics(mnist_dir):
    bn, plain = (train(RunSpec(variant=variant, batch_size=32, **SMALL), data_dir=mnist_dir)
                 for variant in ("bn", "plain"))
    assert all(0 < epoch.batch_statistics_accuracy <= 100 for epoch in bn.epochs)
    assert all(epoch.batch_statistics_accuracy is None for epoch in plain.epochs)
