import math

import pytest
import torch

from bnsuite.records import RunRecord
from bnsuite.spec import RunSpec, SpecError
from bnsuite.train import epoch_order, train, train_seeds

SMALL = dict(epochs=2, train_subset=2_000, validation_size=10_000)


def test_same_spec_gives_the_same_trajectory_bit_for_bit(mnist_dir):
    spec = RunSpec(variant="bn", seed=4, **SMALL)
    first, second = train(spec, data_dir=mnist_dir), train(spec, data_dir=mnist_dir)
    assert first.train_losses == second.train_losses
    assert [e.validation_accuracy for e in first.epochs] == [e.validation_accuracy for e in second.epochs]
    assert first.test_accuracy == second.test_accuracy


def test_different_seeds_give_different_trajectories(mnist_dir):
    zero = train(RunSpec(variant="plain", seed=0, **SMALL), data_dir=mnist_dir)
    one = train(RunSpec(variant="plain", seed=1, **SMALL), data_dir=mnist_dir)
    assert zero.train_losses != one.train_losses


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_fast_step_matches_the_eager_autograd_step(mnist_dir, variant):
    fast = train(RunSpec(variant=variant, pipeline="fast", **SMALL), data_dir=mnist_dir)
    eager = train(RunSpec(variant=variant, pipeline="eager", **SMALL), data_dir=mnist_dir)
    for ours, reference in zip(fast.epochs, eager.epochs):
        assert ours.train_loss == pytest.approx(reference.train_loss, rel=1e-5)
        assert ours.validation_loss == pytest.approx(reference.validation_loss, rel=1e-4)
    assert fast.test_accuracy == pytest.approx(eager.test_accuracy, abs=0.05)


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_tensor_batches_match_the_original_dataloader_pipeline(mnist_dir, variant):
    spec = dict(variant=variant, epochs=2, train_subset=1_000, validation_size=0, batch_size=64)
    ours = train(RunSpec(pipeline="fast", **spec), data_dir=mnist_dir)
    original = train(RunSpec(pipeline="original", **spec), data_dir=mnist_dir)
    assert ours.train_losses == pytest.approx(original.train_losses, rel=1e-6)
    assert ours.test_accuracy == original.test_accuracy


@pytest.mark.parametrize("variant", ["plain", "bn"])
def test_seeds_trained_together_match_each_seed_trained_alone_bit_for_bit(mnist_dir, variant):
    # SGD amplifies any rounding difference within a few hundred steps, so only exact equality shows
    # that a run's result does not depend on the seeds it trained with. 40 steps per epoch, the last
    # batch partial (2,500 = 39 x 64 + 4).
    specs = [RunSpec(variant=variant, seed=seed, epochs=2, train_subset=2_500, validation_size=10_000)
             for seed in (0, 1, 2)]
    together = train_seeds(specs, data_dir=mnist_dir)
    assert [record.spec for record in together] == specs
    for ours, spec in zip(together, specs):
        alone = train(spec, data_dir=mnist_dir)
        assert ours.train_losses == alone.train_losses
        assert [e.validation_loss for e in ours.epochs] == [e.validation_loss for e in alone.epochs]
        assert ours.test_accuracy == alone.test_accuracy
        assert (ours.runs_trained_together, alone.runs_trained_together) == (3, 1)


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
    ((0, 1), dict(lr=0.1), "differ only in their seed"),
    ((0, 0), {}, "same seed twice"),
    ((), {}, "at least one RunSpec"),
])
def test_train_seeds_refuses_runs_that_are_not_one_seed_group(seeds, change, message):
    specs = [RunSpec(seed=seed, **SMALL) for seed in seeds]
    if change:
        specs[-1] = RunSpec(seed=seeds[-1], **SMALL, **change)
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
    (dict(variant="resnet"), "unknown variant 'resnet'"),
    (dict(dataset="cifar10"), "unknown dataset 'cifar10'"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(variant="bn", train_subset=129, batch_size=64), "single image"),
])
def test_a_spec_that_cannot_run_is_refused_with_what_to_change(fields, message):
    with pytest.raises(SpecError, match=message):
        RunSpec(**fields)
