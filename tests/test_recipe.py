"""The training recipe as part of the run spec: optimizer, momentum, weight decay and learning-rate schedule, the
study's SGD (0.01, momentum 0.9, constant) by default and its records unchanged."""

import dataclasses
import hashlib
import json

import pytest
import torch

from bnsuite.core.records import RunRecord
from bnsuite.core.spec import RunSpec, SpecError
from bnsuite.study import study_from_options
from bnsuite.training import fused
from bnsuite.training.models import build_model, make_optimizer
from bnsuite.training.train import train_seeds

FUSED = fused.supports(build_model("bn"), 64)  # the fused step builds here (a C compiler, MKL)


def _old_fingerprint(spec: RunSpec) -> str:
    """RunSpec.fingerprint as schema 11 computed it, before the recipe's fields existed."""
    fields = dataclasses.asdict(spec)
    for name in ("optimizer", "weight_decay", "lr_schedule"):
        del fields[name]
    for name, default in (("init_scale", 1.0), ("network", "mlp")):
        if fields[name] == default:
            del fields[name]
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


def test_the_studys_recipe_leaves_every_runs_name_and_fingerprint_as_they_were():
    for spec in study_from_options("full", studies="all").run_specs():
        assert spec.recipe == ("sgd", 0.9, 0.0, "constant")
        assert spec.fingerprint == _old_fingerprint(spec) and "-sgd" not in spec.case_id


def test_another_recipe_names_its_runs_and_cases_and_reaches_every_run():
    spec = study_from_options("smoke", studies="batch", optimizer="adam", weight_decay="5e-4", lr_schedule="cosine")
    runs = spec.run_specs()
    assert {run.recipe for run in runs} == {("adam", 0.9, 0.0005, "cosine")}
    assert runs[0].case_id == "plain-bs32-adam-wd0.0005-cosine-seed0"
    assert spec.case_name(spec.groups()[0]) == "plain-bs32-adam-wd0.0005-cosine"
    assert study_from_options("smoke", studies="batch", momentum="0.5").run_specs()[0].case_id.endswith(
        "-momentum0.5-seed0")
    # A verdict pinned for the study's recipe says nothing of another's runs.
    assert study_from_options("smoke", studies="ghost").claims.known_exceptions
    assert study_from_options("smoke", studies="ghost", optimizer="adam").claims.known_exceptions == ()


@pytest.mark.parametrize("options, message", [
    ({"optimizer": "rmsprop"}, "unknown optimizer 'rmsprop'; choose from: sgd, adam"),
    ({"weight_decay": "-1"}, "weight decay must be a finite number >= 0"),
    ({"momentum": "1"}, r"momentum must be in \[0, 1\)"),
    ({"lr_schedule": "step"}, "unknown learning-rate schedule 'step'; choose from: constant, cosine"),
])
def test_a_bad_recipe_is_one_clear_error_before_anything_trains(options, message):
    with pytest.raises(SpecError, match=message):
        study_from_options("smoke", studies="batch", **options)


def test_the_original_pipeline_refuses_a_recipe_the_notebook_did_not_have():
    with pytest.raises(SpecError, match="the original pipeline trains the notebook's recipe only"):
        RunSpec(pipeline="original", optimizer="adam")


def test_the_optimizer_takes_the_recipe():
    model = build_model("bn")
    adam = make_optimizer(model, RunSpec(optimizer="adam", weight_decay=1e-4, lr=0.001), fused=False)
    sgd = make_optimizer(model, RunSpec(momentum=0.5, weight_decay=5e-4, lr_schedule="cosine"), fused=False)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["weight_decay"] == 1e-4
    assert isinstance(sgd, torch.optim.SGD) and (sgd.param_groups[0]["momentum"],
                                                 sgd.param_groups[0]["weight_decay"]) == (0.5, 5e-4)
    cosine = RunSpec(lr=0.1, epochs=4, lr_schedule="cosine")
    assert [cosine.lr_at(epoch) for epoch in (1, 3)] == pytest.approx([0.1, 0.05])


def test_a_cosine_schedule_trains_its_first_epoch_at_the_full_rate_and_the_next_ones_slower(mnist_dir):
    runs = [RunSpec(variant="bn", epochs=2, train_subset=512, validation_size=10_000, lr=0.05, lr_schedule=schedule)
            for schedule in ("constant", "cosine")]
    constant, cosine = (train_seeds([run], data_dir=mnist_dir)[0] for run in runs)
    # The fused step takes a schedule; where it cannot be built the ATen step does not, and the eager one trains.
    assert cosine.training_step == (constant.training_step if FUSED else "eager")
    # Epoch 1 at the same rate: the same loss up to the steps' rounding; epoch 2 at half of it: not the same run.
    assert cosine.epochs[0].train_loss == pytest.approx(constant.epochs[0].train_loss, rel=1e-4)
    assert cosine.epochs[1].train_loss != pytest.approx(constant.epochs[1].train_loss, rel=1e-3)


def test_weight_decay_and_adam_change_the_run_and_adam_trains_on_the_eager_step(mnist_dir):
    base = RunSpec(variant="plain", epochs=2, train_subset=512, validation_size=10_000, lr=0.1)
    plain, decayed, adam = (train_seeds([run], data_dir=mnist_dir)[0] for run in (
        base, dataclasses.replace(base, weight_decay=0.5), dataclasses.replace(base, optimizer="adam", lr=0.001)))
    assert decayed.training_step == (plain.training_step if FUSED else "eager") and adam.training_step == "eager"
    # A strong decay holds the weights near 0: the loss stays near ln 10 while plain's falls.
    assert decayed.epochs[-1].train_loss > plain.epochs[-1].train_loss + 0.3
    assert adam.epochs[-1].train_loss != pytest.approx(plain.epochs[-1].train_loss, rel=1e-3)


def test_a_recipe_trains_the_same_on_the_fused_step_as_through_autograd(mnist_dir):
    run = RunSpec(variant="bn", epochs=3, train_subset=512, validation_size=10_000, lr=0.05, weight_decay=0.01,
                  lr_schedule="cosine")
    fast, eager = (train_seeds([spec], data_dir=mnist_dir)[0] for spec in (run, dataclasses.replace(
        run, pipeline="eager")))
    assert eager.training_step == "eager"
    # float32 steps of two implementations part only by rounding over 24 steps; a missing decay or a schedule
    # applied at the wrong epoch moves the losses by far more.
    assert [e.train_loss for e in fast.epochs] == pytest.approx([e.train_loss for e in eager.epochs], rel=2e-3)


def test_schema_11_records_load_with_the_studys_recipe(mnist_dir):
    spec = study_from_options("smoke", studies="batch", variants="bn", batch_sizes="128", seeds="1", epochs=1)
    record = train_seeds(spec.run_specs(), data_dir=mnist_dir, study=spec)[0]
    raw = json.loads(record.to_json())
    for name in ("optimizer", "weight_decay", "lr_schedule"):
        del raw["spec"][name], raw["study"][name]
    del raw["study"]["momentum"]
    raw["schema_version"] = 11
    assert RunRecord.from_json(json.dumps(raw)) == record
