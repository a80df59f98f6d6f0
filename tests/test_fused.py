"""The fused step (bnsuite.fused, bnsuite/training/native/mlp.c): its arithmetic against autograd's in float64, each
model's numbers independent of its group and of the thread count, its evaluation against the modules', and the fallback
to the ATen fast step where it cannot be built."""

import copy
from pathlib import Path

import pytest
import torch

from bnsuite.core.spec import RunSpec
from bnsuite.training import fused
from bnsuite.training.batchnorm import RENORM_RAMP, RENORM_WARMUP
from bnsuite.training.epochs import epoch_order
from bnsuite.training.evaluation import evaluate, evaluate_with_batch_statistics
from bnsuite.training.models import EagerStep, build_model
from bnsuite.training.precise import with_precise_statistics
from bnsuite.training.train import train_seeds

pytestmark = pytest.mark.skipif(not fused.supports(build_model("plain"), 64),
                                reason="the fused step cannot be built here (no C compiler or no MKL)")
VARIANTS = ["plain", "bn", "bn-ghost2", "bn-ghost4", "bn-ghost8", "ln", "plain-dropout", "bn-dropout", "bn-after-relu",
            "bn-noisy", "bn-renorm2", "bn-renorm4", "ioffe-plain", "ioffe-bn", "deep-plain", "deep-bn", "bn-ema0.99"]


def _models(variant, seeds, dtype=torch.float32):
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build_model(variant).to(dtype))
    return models


def _data(count, features=784, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    images = (torch.rand(count, features, generator=generator, dtype=dtype) * 2 - 1)
    return images, torch.randint(0, 10, (count,), generator=generator)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_fused_step_computes_autograds_arithmetic_in_float64(variant):
    # In float64 the rounding stays far below the tolerance even where ghost batches of 2 amplify it (the float32
    # trajectories part within a few dozen steps there, as any two correct implementations do): what is compared
    # is the arithmetic. 197 images in batches of 66: the last batch ragged (65: a ghost batch of 3 for g = 2).
    # Noisy BN's noise is drawn as the module draws it: the same draws on both sides.
    _assert_steps_as_autograd(_models(variant, [0], torch.float64)[0], variant)


@pytest.mark.parametrize("variant", ["bn-renorm2", "bn-renorm4"])
@pytest.mark.parametrize("steps_before", [RENORM_WARMUP + RENORM_RAMP // 3, 10 * RENORM_RAMP])
def test_the_fused_batch_renorm_corrects_and_clips_as_the_module_does_past_its_warm_up(variant, steps_before):
    # Running estimates far from the batches' statistics, so r and d are clipped for some features and not others.
    model = _models(variant, [0], torch.float64)[0]
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in (model.bn1, model.bn2):
            layer.num_batches_tracked.fill_(steps_before)
            layer.running_mean.copy_(torch.randn(layer.num_features, generator=generator, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(layer.num_features, generator=generator, dtype=torch.float64) * 4)
    _assert_steps_as_autograd(model, variant)


@pytest.mark.parametrize("variant", ["plain", "bn", "ln", "bn-dropout", "deep-bn"])
def test_the_fused_step_decays_weights_and_follows_a_schedule_as_torchs_sgd_does(variant):
    # Weight decay on every parameter (weights, biases, BN's gamma and beta), and a learning rate changed between
    # steps as a schedule changes it between epochs: the same arithmetic as torch.optim.SGD's, in float64.
    _assert_steps_as_autograd(_models(variant, [0], torch.float64)[0], variant, weight_decay=0.05,
                              lrs=(0.01, 0.004, 0.001))


def _assert_steps_as_autograd(model, variant, *, weight_decay=0.0, lrs=(0.01, 0.01, 0.01)):
    reference = copy.deepcopy(model)
    images, labels = _data(197, dtype=torch.float64)
    mask_generator = torch.Generator().manual_seed(5)
    eager_generator_state = mask_generator.get_state()  # F.dropout draws from torch's own generator
    step = fused.FusedStep([model], images, labels, lr=lrs[0], momentum=0.9, batch_size=66,
                           dropout_generators=[mask_generator], weight_decay=weight_decay)
    eager = EagerStep(reference, RunSpec(variant=variant, lr=lrs[0], weight_decay=weight_decay))
    order = epoch_order(197, torch.Generator().manual_seed(3)).view(1, -1)
    losses, correct = torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
    eager_hits = 0
    for index in range(3):
        step.set_lrs([lrs[index]])
        for group in eager.optimizer.param_groups:
            group["lr"] = lrs[index]
        step.train(order, index, 1, losses, correct)
        batch = order[0, index * 66:(index + 1) * 66]
        state = torch.get_rng_state()
        torch.set_rng_state(eager_generator_state)
        eager_loss, logits = eager(images[batch].unsqueeze(0), labels[batch].unsqueeze(0))
        eager_generator_state = torch.get_rng_state()
        torch.set_rng_state(state)
        eager_hits += int((logits[0].argmax(1) == labels[batch]).sum())
        assert losses[0, index].item() == pytest.approx(eager_loss.item(), rel=1e-9)
    assert correct.item() == eager_hits
    # Weights of about 0.03 apart by 1e-10 at most: float64 rounding, amplified by ghost batches of 2; an error in
    # the arithmetic would show at float32's scale or above.
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-7, atol=1e-10,
                                   msg=lambda text, name=name: name + text)


def _assert_each_equals_the_model_alone(results: dict) -> None:
    """{(group size, threads): (model 0's losses, its correct count, its state)}: each equal bit for bit to the
    model trained alone on 2 threads, (1, 2)."""
    alone_losses, alone_correct, alone = results[1, 2]
    for key, (losses, correct, state) in results.items():
        assert torch.equal(losses, alone_losses) and correct == alone_correct, key
        assert all(torch.equal(alone[name], state[name]) for name in alone), key


def _group_on_threads(network, variant, seeds, threads, images, labels, orders, batch_size):
    """`seeds`' models trained together on `threads` threads for two calls (3 steps, then 1): each model's losses,
    hits and state."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        models = _cnn_models(variant, seeds) if network == "cnn" else _models(variant, seeds)
        step = fused.fused_step(models, images, labels, lr=0.05, momentum=0.9, batch_size=batch_size,
                                dropout_generators=[torch.Generator().manual_seed(seed) for seed in seeds])
        losses, correct = torch.zeros(len(seeds), 4), torch.zeros(len(seeds), dtype=torch.int64)
        step.train(orders[list(seeds)].contiguous(), 0, 3, losses, correct)
        step.train(orders[list(seeds)].contiguous(), 3, 1, losses, correct)
    finally:
        torch.set_num_threads(before)
    return [(losses[index], correct[index], model.state_dict()) for index, model in enumerate(models)]


@pytest.mark.parametrize(("network", "variant"), [("mlp", "bn"), ("mlp", "bn-dropout"), ("mlp", "bn-noisy"),
                                                  ("mlp", "ioffe-bn"), ("cnn", "bn"), ("cnn", "plain")])
def test_every_model_of_a_group_the_threads_do_not_divide_steps_as_it_does_alone(network, variant):
    """5 models on 2 threads: the call's steps are cut into equal shares (bnsuite/training/native/common.h,
    spread_steps), so model 2 takes its first step on one thread and its last two on the other; every model of the group
    equals itself trained alone on 1 thread, bit for bit: losses, hits and every parameter and buffer."""
    batch_size = 16 if network == "cnn" else 33
    images, labels = _data(3 * batch_size + 9, seed=3)  # 4 batches, the last ragged
    orders = torch.stack([epoch_order(len(labels), torch.Generator().manual_seed(seed)) for seed in range(5)])
    group = _group_on_threads(network, variant, range(5), 2, images, labels, orders, batch_size)
    for seed, (losses, correct, state) in enumerate(group):
        (alone_losses, alone_correct, alone), = _group_on_threads(network, variant, [seed], 1, images, labels,
                                                                  orders, batch_size)
        assert torch.equal(losses, alone_losses) and correct == alone_correct, seed
        assert all(torch.equal(alone[name], state[name]) for name in alone), seed


@pytest.mark.parametrize("variant", ["plain", "bn", "bn-ghost4", "ln", "bn-dropout", "bn-after-relu", "bn-noisy",
                                     "bn-renorm4", "ioffe-bn", "deep-bn"])
@pytest.mark.parametrize("batch_size", [2, 33, 128])
def test_a_model_steps_the_same_in_any_group_and_on_any_number_of_threads(variant, batch_size):
    """Groups of 1, 2 and 5 on 2 threads, and of 5 on 1 thread, ragged last batches included: every loss,
    parameter and buffer of model 0 equal bit for bit."""
    images, labels = _data(3 * batch_size + max(2, batch_size // 2 + 1), seed=batch_size)  # never a batch of 1
    orders = torch.stack([epoch_order(len(labels), torch.Generator().manual_seed(seed)) for seed in range(5)])
    results = {}
    before = torch.get_num_threads()
    for size, threads in ((1, 2), (2, 2), (5, 2), (5, 1)):
        torch.set_num_threads(threads)
        try:
            models = _models(variant, range(size))
            step = fused.FusedStep(models, images, labels, lr=0.05, momentum=0.9, batch_size=batch_size,
                                   dropout_generators=[torch.Generator().manual_seed(seed) for seed in range(size)])
        finally:
            torch.set_num_threads(before)
        losses, correct = torch.zeros(size, 4), torch.zeros(size, dtype=torch.int64)
        torch.set_num_threads(threads)
        try:
            step.train(orders[:size].contiguous(), 0, 2, losses, correct)
            step.train(orders[:size].contiguous(), 2, 2, losses, correct)
        finally:
            torch.set_num_threads(before)
        results[size, threads] = (losses[0], correct[0], models[0].state_dict())
    _assert_each_equals_the_model_alone(results)


@pytest.mark.parametrize("variant", ["plain", "bn", "bn-ghost4", "ln", "bn-dropout", "bn-after-relu", "bn-noisy",
                                     "bn-renorm4", "ioffe-bn"])
def test_the_fused_evaluation_agrees_with_the_modules_and_changes_nothing(variant):
    models = _models(variant, [0, 1])
    train_images, train_labels = _data(640)
    step = fused.FusedStep(models, train_images, train_labels, lr=0.05, momentum=0.9, batch_size=64,
                           dropout_generators=[torch.Generator().manual_seed(seed) for seed in range(2)])
    orders = torch.stack([epoch_order(640, torch.Generator().manual_seed(seed)) for seed in range(2)])
    step.train(orders, 0, 10, torch.zeros(2, 10), torch.zeros(2, dtype=torch.int64))
    images, labels = _data(1001, seed=1)
    states = [copy.deepcopy(model.state_dict()) for model in models]
    running = step.evaluate(images, labels)
    batches = step.evaluate(images, labels, batch_statistics=True)  # 15 batches of 64, the last of 41 (+ 0)
    if variant == "bn-noisy":  # the module evaluates it itself (FusedStep.evaluate)
        assert batches is None
        batches = [(None, None)] * len(models)
    for model, state, (loss, accuracy), (_, batch_accuracy) in zip(models, states, running, batches, strict=True):
        module_loss, module_accuracy = evaluate(model, images, labels)
        assert loss == pytest.approx(module_loss, rel=1e-5)
        # A prediction within rounding of a tie may flip between two kernels: at most one image of 1,001.
        assert accuracy == pytest.approx(module_accuracy, abs=0.1)
        if batch_accuracy is not None and variant.startswith("bn"):
            assert batch_accuracy == pytest.approx(evaluate_with_batch_statistics(model, images, labels, 64), abs=0.1)
        assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("variant", ["bn", "bn-ghost4", "bn-after-relu", "bn-ema0.99", "bn-dropout", "ioffe-bn",
                                     "deep-bn"])
def test_the_fused_precise_bn_takes_each_layers_population_statistics_as_the_modules_do_in_float64(variant):
    # float64: what is compared is the arithmetic (which batches, which inputs, which layers), not the rounding.
    # 641 training images in batches of 64: the last batch of one image joins the one before.
    models = _models(variant, [0, 1], torch.float64)
    train_images, train_labels = _data(641, dtype=torch.float64)
    step = fused.FusedStep(models, train_images, train_labels, lr=0.05, momentum=0.9, batch_size=64,
                           dropout_generators=[torch.Generator().manual_seed(seed) for seed in range(2)])
    orders = torch.stack([epoch_order(641, torch.Generator().manual_seed(seed)) for seed in range(2)])
    step.train(orders, 0, 10, torch.zeros(2, 10, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
    held_images, held_labels = _data(301, seed=1, dtype=torch.float64)
    states = [copy.deepcopy(model.state_dict()) for model in models]
    accuracies, statistics = step.precise(train_images, held_images, held_labels)
    for index, (model, state) in enumerate(zip(models, states, strict=True)):
        precise = with_precise_statistics(model, train_images, batch_size=64)
        layers = [module for module in precise.modules() if getattr(module, "running_mean", None) is not None]
        assert len(layers) == len(statistics)
        for layer, (means, variances) in zip(layers, statistics, strict=True):
            torch.testing.assert_close(means[index], layer.running_mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(variances[index], layer.running_var, rtol=1e-10, atol=1e-12)
        assert accuracies[index] == evaluate(precise, held_images, held_labels)[1]
        assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("variant", ["plain", "ln", "bn-noisy", "bn-renorm4"])
def test_the_fused_step_leaves_precise_bn_to_the_modules_where_it_cannot_take_it(variant):
    # No running estimates (plain, ln), or a batch-statistics forward that draws noise or moves the estimates.
    models = _models(variant, [0])
    images, labels = _data(128)
    step = fused.FusedStep(models, images, labels, lr=0.05, momentum=0.9, batch_size=64,
                           dropout_generators=[torch.Generator().manual_seed(0)])
    assert step.precise(images, images, labels) is None


@pytest.mark.parametrize("steps_before", [0, RENORM_WARMUP + RENORM_RAMP // 3])
def test_a_fused_batch_renorm_evaluation_moves_copies_of_the_estimates_as_the_module_does_in_float64(steps_before):
    # Batch Renorm's r and d read the running estimates, which its module moves batch after batch in training
    # mode (and its bounds widen with its step count): the fused evaluation moves copies the same way. float64:
    # the accuracies must agree exactly; evaluating twice gives the same (the model's own estimates stay put).
    models = _models("bn-renorm2", [0, 1], torch.float64)
    for model in models:
        for layer in (model.bn1, model.bn2):
            layer.num_batches_tracked.fill_(steps_before)
    train_images, train_labels = _data(640, dtype=torch.float64)
    step = fused.FusedStep(models, train_images, train_labels, lr=0.05, momentum=0.9, batch_size=64)
    orders = torch.stack([epoch_order(640, torch.Generator().manual_seed(seed)) for seed in range(2)])
    step.train(orders, 0, 10, torch.zeros(2, 10, dtype=torch.float64), torch.zeros(2, dtype=torch.int64))
    images, labels = _data(1001, seed=1, dtype=torch.float64)
    states = [copy.deepcopy(model.state_dict()) for model in models]
    first = step.evaluate(images, labels, batch_statistics=True)
    assert step.evaluate(images, labels, batch_statistics=True) == first
    for model, state, (_, accuracy) in zip(models, states, first, strict=True):
        assert accuracy == evaluate_with_batch_statistics(model, images, labels, 64)
        assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("network", ["mlp", "cnn"])
def test_a_batch_statistics_evaluation_never_normalizes_a_single_image(network):
    models = _cnn_models("bn", [0]) if network == "cnn" else _models("bn", [0])
    images, labels = _data(129)  # batches of 64: 64, then 65 rather than 64 and 1
    step = fused.fused_step(models, images, labels, lr=0.05, momentum=0.9, batch_size=64)
    (_, accuracy), = step.evaluate(images, labels, batch_statistics=True)
    shaped = images.view(-1, 1, 28, 28) if network == "cnn" else images
    assert accuracy == pytest.approx(evaluate_with_batch_statistics(models[0], shaped, labels, 64), abs=0.1)


def test_records_name_the_fused_step_and_its_compiler(mnist_dir):
    records = train_seeds([RunSpec(variant="bn", seed=seed, epochs=1, train_subset=500) for seed in (0, 1)],
                          data_dir=mnist_dir)
    assert {record.training_step for record in records} == {fused.build().step_name}
    assert fused.build().step_name.startswith("fused (")



def test_noisy_bn_on_the_fused_step_is_probed_and_evaluated_with_the_noise_the_eager_step_would_draw(mnist_dir):
    # The fused step draws noise from each run's own generator, never advancing torch's: the probe and the
    # batch-statistics evaluation, which draw noise too, must start where that generator stands, as they start
    # where torch's stands on the eager step; otherwise they would see the same draw at every checkpoint.
    specs = {pipeline: RunSpec(variant="bn-noisy", seed=3, epochs=2, train_subset=640, pipeline=pipeline)
             for pipeline in ("fast", "eager")}
    fused_run, eager_run = (train_seeds([spec], data_dir=mnist_dir)[0] for spec in specs.values())
    assert fused_run.training_step.startswith("fused (") and eager_run.training_step == "eager"
    assert fused_run.activations.steps == eager_run.activations.steps == (0, 10, 20)
    fused_values, eager_values = (torch.tensor(run.activations.values) for run in (fused_run, eager_run))
    torch.testing.assert_close(fused_values, eager_values, rtol=1e-3, atol=1e-3)
    for fused_epoch, eager_epoch in zip(fused_run.epochs, eager_run.epochs, strict=True):
        assert fused_epoch.batch_statistics_accuracy == pytest.approx(eager_epoch.batch_statistics_accuracy, abs=0.02)

@pytest.mark.parametrize("environment", [{"CC": "/bin/false"}, {fused.SWITCH_VARIABLE: "0"}])
def test_without_a_compiler_or_with_the_switch_off_the_aten_fast_step_trains_and_the_record_says_so(
        mnist_dir, monkeypatch, tmp_path, environment):
    monkeypatch.setenv(fused.BUILD_DIR_VARIABLE, str(tmp_path))  # no cached build to load
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    fused.build.cache_clear()
    try:
        assert "the ATen fast step (the fused one is unavailable:" in fused.status()
        spec = RunSpec(variant="bn", epochs=1, train_subset=500)
        assert train_seeds([spec], data_dir=mnist_dir)[0].training_step == "fast"
    finally:
        fused.build.cache_clear()
    assert list(tmp_path.iterdir()) == []  # a failed build leaves nothing behind


def test_a_damaged_build_in_the_cache_is_made_again(monkeypatch, tmp_path):
    # The name of the build this process loaded (one compilation fewer than building one to learn it), in a
    # directory this process never loaded from (a loaded path is not read again).
    name = Path(fused.build().library._name).name
    (tmp_path / name).write_bytes(b"not a library")
    monkeypatch.setenv(fused.BUILD_DIR_VARIABLE, str(tmp_path))
    fused.build.cache_clear()
    try:
        assert fused.build().step_name.startswith("fused (")
        assert (tmp_path / name).read_bytes()[:4] == b"\x7fELF"
    finally:
        fused.build.cache_clear()


def test_a_build_that_failed_is_not_tried_again_in_the_process(monkeypatch, tmp_path):
    monkeypatch.setenv(fused.BUILD_DIR_VARIABLE, str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    calls = []
    run = fused.subprocess.run
    monkeypatch.setattr(fused.subprocess, "run", lambda *args, **kwargs: calls.append(args) or run(*args, **kwargs))
    fused.build.cache_clear()
    try:
        for _ in range(3):
            with pytest.raises(fused.Unavailable, match="does not run"):
                fused.build()
        assert len(calls) == 1
    finally:
        fused.build.cache_clear()


# --- the ConvNet's fused step (bnsuite/training/native/cnn.c) ---

CNN_VARIANTS = ["plain", "bn", "bn-ghost2", "bn-ghost8", "ln", "gn"]


def _cnn_models(variant, seeds, dtype=torch.float32, image_shape=(1, 28, 28)):
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(build_model(variant, network="cnn", image_shape=image_shape).to(dtype))
    return models


@pytest.mark.parametrize("variant", CNN_VARIANTS)
def test_the_fused_convnet_step_computes_autograds_arithmetic_in_float64(variant):
    # 53 images in batches of 20: a ragged last batch of 13 (ghost batches of 8 and 5, or 2s and a 3).
    model = _cnn_models(variant, [0], torch.float64)[0]
    reference = copy.deepcopy(model)
    images, labels = _data(53, dtype=torch.float64)
    step = fused.fused_step([model], images, labels, lr=0.05, momentum=0.9, batch_size=20)
    assert isinstance(step, fused.FusedConvStep)
    eager = EagerStep(reference, RunSpec(variant=variant, network="cnn", lr=0.05))
    order = epoch_order(53, torch.Generator().manual_seed(3)).view(1, -1)
    losses, correct = torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
    eager_hits = 0
    for index in range(3):
        step.train(order, index, 1, losses, correct)
        batch = order[0, index * 20:(index + 1) * 20]
        eager_loss, logits = eager(images[batch].view(1, -1, 1, 28, 28), labels[batch].unsqueeze(0))
        eager_hits += int((logits[0].argmax(1) == labels[batch]).sum())
        assert losses[0, index].item() == pytest.approx(eager_loss.item(), rel=1e-9)
    assert correct.item() == eager_hits
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-7, atol=1e-10,
                                   msg=lambda text, name=name: name + text)


def test_the_fused_convnet_step_takes_images_of_three_channels():
    # CIFAR-10's shape: 3 input channels (unfolded channels-last) and 32x32 maps pooled to 8x8.
    model = _cnn_models("bn", [0], torch.float64, image_shape=(3, 32, 32))[0]
    reference = copy.deepcopy(model)
    images, labels = _data(24, features=3 * 32 * 32, dtype=torch.float64)
    step = fused.fused_step([model], images, labels, lr=0.05, momentum=0.9, batch_size=12)
    eager = EagerStep(reference, RunSpec(variant="bn", network="cnn", dataset="cifar10", lr=0.05))
    losses, correct = torch.zeros(1, 2, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
    step.train(torch.arange(24).view(1, -1), 0, 2, losses, correct)
    for index in range(2):
        batch = slice(index * 12, (index + 1) * 12)
        eager(images[batch].view(1, -1, 3, 32, 32), labels[batch].unsqueeze(0))
    expected = reference.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-7, atol=1e-10,
                                   msg=lambda text, name=name: name + text)


@pytest.mark.parametrize("variant", ["plain", "bn", "bn-ghost4", "gn"])
def test_a_convnet_steps_the_same_in_any_group_and_on_any_number_of_threads(variant):
    images, labels = _data(3 * 16 + 9, seed=2)
    orders = torch.stack([epoch_order(len(labels), torch.Generator().manual_seed(seed)) for seed in range(3)])
    results = {}
    before = torch.get_num_threads()
    for size, threads in ((1, 2), (3, 2), (3, 1)):
        torch.set_num_threads(threads)
        try:
            models = _cnn_models(variant, range(size))
            step = fused.fused_step(models, images, labels, lr=0.05, momentum=0.9, batch_size=16)
            losses, correct = torch.zeros(size, 4), torch.zeros(size, dtype=torch.int64)
            step.train(orders[:size].contiguous(), 0, 4, losses, correct)
        finally:
            torch.set_num_threads(before)
        results[size, threads] = (losses[0], correct[0], models[0].state_dict())
    _assert_each_equals_the_model_alone(results)


@pytest.mark.parametrize("variant", ["plain", "bn", "bn-ghost4", "gn"])
def test_the_fused_convnet_evaluation_agrees_with_the_modules_and_changes_nothing(variant):
    models = _cnn_models(variant, [0, 1])
    train_images, train_labels = _data(320)
    step = fused.fused_step(models, train_images, train_labels, lr=0.05, momentum=0.9, batch_size=32)
    orders = torch.stack([epoch_order(320, torch.Generator().manual_seed(seed)) for seed in range(2)])
    step.train(orders, 0, 10, torch.zeros(2, 10), torch.zeros(2, dtype=torch.int64))
    images, labels = _data(161, seed=1)  # batches of 32: the last of 1 joins the one before
    states = [copy.deepcopy(model.state_dict()) for model in models]
    running = step.evaluate(images, labels)
    batches = step.evaluate(images, labels, batch_statistics=True)
    for model, state, (loss, accuracy), (_, batch_accuracy) in zip(models, states, running, batches, strict=True):
        module_loss, module_accuracy = evaluate(model, images.view(-1, 1, 28, 28), labels)
        assert loss == pytest.approx(module_loss, rel=1e-5)
        assert accuracy == pytest.approx(module_accuracy, abs=0.7)  # at most one image of 161 at a rounding tie
        if batch_accuracy is not None and variant.startswith("bn"):
            assert batch_accuracy == pytest.approx(
                evaluate_with_batch_statistics(model, images.view(-1, 1, 28, 28), labels, 32), abs=0.7)
        assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())


@pytest.mark.parametrize("variant", ["bn", "bn-ghost4"])
def test_a_convnet_evaluates_the_same_in_any_group_and_on_any_number_of_threads(variant):
    """The evaluation cuts the models' batches between the threads (3 models on 2: a model and a half each); a
    model's loss is still its batches' losses summed in order, as alone on one thread: bit for bit."""
    models = _cnn_models(variant, range(3))
    images, labels = _data(7 * 16 + 1, seed=3)  # a last batch of one image, which batch statistics merge
    before = torch.get_num_threads()
    results = {}
    try:
        for group, threads in (((0, 1, 2), 2), ((0, 1, 2), 1), ((0,), 1), ((1,), 2), ((2,), 1)):
            torch.set_num_threads(threads)
            step = fused.fused_step([models[m] for m in group], images, labels, lr=0.05, momentum=0.9, batch_size=16)
            for mode in (False, True):
                for m, result in zip(group, step.evaluate(images, labels, batch_statistics=mode), strict=True):
                    results.setdefault((m, mode), set()).add(result)
    finally:
        torch.set_num_threads(before)
    assert all(len(found) == 1 for found in results.values()), results
    assert len({results[m, False].pop() for m in range(3)}) == 3  # three models, three results


def test_the_fused_step_covers_the_convnet_only_as_built():
    """Judged by the modules: another eps, momentum or group count, or maps the poolings cannot halve exactly, train
    on the eager step."""
    assert fused.supports(build_model("bn", network="cnn"), 64)
    assert fused.supports(build_model("gn", network="cnn"), 64)
    odd = build_model("bn", network="cnn", image_shape=(1, 30, 30))
    assert not fused.supports(odd, 64)
    other_eps = build_model("bn", network="cnn")
    other_eps.bn1.eps = other_eps.bn2.eps = 1e-3
    assert not fused.supports(other_eps, 64)
    mixed = build_model("bn", network="cnn")
    mixed.bn2 = torch.nn.GroupNorm(4, 16)
    assert not fused.supports(mixed, 64)


def test_convnet_records_name_the_fused_step_and_train_their_seeds_together(mnist_dir):
    specs = [RunSpec(variant="bn", network="cnn", seed=seed, epochs=1, train_subset=256) for seed in (0, 1)]
    records = train_seeds(specs, data_dir=mnist_dir)
    assert {record.training_step for record in records} == {fused.build().step_name}
    assert all(record.runs_trained_together == 2 for record in records)
    alone = train_seeds(specs[1:], data_dir=mnist_dir)[0]
    assert alone.epochs[0].train_loss == records[1].epochs[0].train_loss
    assert alone.test_accuracy == records[1].test_accuracy
