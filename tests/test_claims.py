"""The claims' decision rule, the gate, and the known exceptions a study carries."""

import pytest

from bnsuite.claims import bn_converges_faster, bn_lower_final_loss, gate, p_smaller
from bnsuite.records import Environment, EpochRecord, RunRecord
from bnsuite.spec import CONTRADICTED, NOT_SHOWN, SUPPORTED, ClaimSettings, KnownException, RunSpec
from bnsuite.study import PROFILES, study_from_options

SETTINGS = ClaimSettings(target_loss=0.5)
ENVIRONMENT = Environment(torch_version="2", device="cpu", device_name="cpu", cpu_model="cpu", cpu_flags=(),
                          cpu_capability="AVX2", blas="mkl", threads=2, python_version="3.11", platform="linux",
                          git_commit=None, dataset_checksum="0" * 32)


def _run(variant, seed, losses, *, diverged_at=None):
    """A record of `variant` at batch 128 whose epochs end at `losses`, diverging at `diverged_at` if given."""
    spec = RunSpec(variant=variant, seed=seed, batch_size=128, epochs=len(losses) + (diverged_at is not None))
    epochs = tuple(EpochRecord(epoch=i + 1, train_loss=loss, train_accuracy=90.0, validation_loss=0.3,
                               validation_accuracy=90.0, test_loss=0.3, test_accuracy=90.0, epoch_time_s=1.0)
                   for i, loss in enumerate(losses))
    return RunRecord(spec=spec, study=None, runs_trained_together=1, group_seeds=(seed,), epochs=epochs,
                     test_loss=0.3, test_accuracy=90.0, train_time_s=1.0, steps=10, diverged_at_epoch=diverged_at,
                     environment=ENVIRONMENT, started_at="now")


def test_a_diverged_run_counts_as_the_worst_outcome():
    # bn beats both finished plain runs; the diverged plain run must count as worse than every bn run.
    bn = [_run("bn", seed, [0.9, loss]) for seed, loss in enumerate([0.10, 0.12, 0.11])]
    plain = [_run("plain", 0, [0.9, 0.30]), _run("plain", 1, [0.9, 0.31]), _run("plain", 2, [0.9], diverged_at=2)]
    result = bn_lower_final_loss(128, SETTINGS).evaluate(bn + plain)
    # Counted worst: 9 of 9 pairs favour bn, p = 1/20. Dropped (p = 1/10) or counted best: not shown.
    assert result.verdict == SUPPORTED and result.p_value == pytest.approx(0.05)
    assert "1 diverged" in result.evidence


def test_a_run_that_reached_the_target_and_then_diverged_never_converged():
    bn = [_run("bn", seed, [0.4, 0.3]) for seed in range(3)]
    plain = [_run("plain", seed, [0.45], diverged_at=2) for seed in range(3)]  # reached 0.5 in epoch 1, then blew up
    result = bn_converges_faster(128, SETTINGS).evaluate(bn + plain)
    assert "plain [never, never, never]" in result.evidence and result.verdict == SUPPORTED


def test_p_value_is_one_twentieth_when_every_run_of_one_group_of_three_beats_every_run_of_the_other():
    assert p_smaller([1, 2, 3], [4, 5, 6]) == pytest.approx(0.05)
    assert p_smaller([1, 5, 3], [4, 2, 6]) > 0.05


@pytest.mark.parametrize("verdict, known, outcome", [
    (SUPPORTED, None, "pass"),
    (NOT_SHOWN, None, "fail"),
    (NOT_SHOWN, NOT_SHOWN, "xfail"),
    (CONTRADICTED, CONTRADICTED, "xfail"),
    (CONTRADICTED, NOT_SHOWN, "fail"),  # the verdict moved: the exception no longer says what we measure
    (NOT_SHOWN, CONTRADICTED, "fail"),
    (SUPPORTED, NOT_SHOWN, "fail"),  # the claim now holds: take it off the list
])
def test_the_gate_expects_a_failure_only_with_the_verdict_the_exception_records(verdict, known, outcome):
    result = bn_lower_final_loss(128, SETTINGS).evaluate([])
    result = type(result)(result.name, result.statement, result.rule, "evidence", verdict, 0.5)
    exception = KnownException(result.name, known, "why") if known else None
    assert gate(result, exception)[0] == outcome


def test_known_exceptions_carry_over_only_to_the_runs_the_profile_measured():
    full = PROFILES["full"].claims.known_exceptions
    assert study_from_options("full").claims.known_exceptions == full
    # Other epochs, seeds, learning rate or target loss: the profile's measurements say nothing about them.
    for changed in (dict(epochs="3"), dict(seeds="0,1,2,3"), dict(lr="0.1"), dict(target_loss="0.2")):
        assert study_from_options("full", **changed).claims.known_exceptions == (), changed
    # A narrower matrix keeps the exceptions of the claims it still judges on the same runs.
    assert study_from_options("full", variants="plain,bn", batch_sizes="32,64,128").claims.known_exceptions == full
    assert study_from_options("full", batch_sizes="64,128").claims.known_exceptions == ()
    smoke = study_from_options("smoke", batch_sizes="32").claims.known_exceptions
    assert [exception.claim for exception in smoke] == ["bn-converges-faster-bs32"]
    assert study_from_options("smoke", batch_sizes="64").claims.known_exceptions == ()


def test_a_known_exception_must_name_a_verdict_that_is_not_supported():
    with pytest.raises(ValueError, match="'not shown' or 'contradicted'"):
        KnownException("bn-lower-final-loss-bs64", SUPPORTED, "why")
