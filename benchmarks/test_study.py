"""The study's matrix: one real training run per case, timed by pytest-benchmark.

Each case trains exactly once (one round, one iteration, no warm-up run), so
the benchmark's time is one full training run, evaluation included; the
record's own `train_time_s` excludes evaluation. The record is saved to the
results directory and kept for the claims in test_claims.py.
"""


def test_training_run(benchmark, run_spec, study, study_session):
    record = benchmark.pedantic(study_session.run, args=(run_spec,), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({
        "case": run_spec.case_id,
        "profile": study.profile,
        "train_loss": record.train_losses,
        "validation_loss": [e.validation_loss for e in record.epochs],
        "validation_accuracy": [e.validation_accuracy for e in record.epochs],
        "test_accuracy": record.test_accuracy,
        "train_time_s": record.train_time_s,
        "steps": record.steps,
        "target_loss": study.target_loss,
        "epochs_to_target": record.epochs_to_target(study.target_loss),
        "diverged_at_epoch": record.diverged_at_epoch,
    })
    assert record.steps == run_spec.steps_per_epoch * (record.diverged_at_epoch or run_spec.epochs)
    assert len(record.epochs) == (record.diverged_at_epoch - 1 if record.diverged else run_spec.epochs)
