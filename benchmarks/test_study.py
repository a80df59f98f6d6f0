"""The studies' runs: one case per group of runs that train together, timed by pytest-benchmark.

A case trains its runs once (one round, one iteration, no warm-up run): the
seeds of a variant and batch size, and in the learning-rate and init studies
every point of the sweep too, as one batched computation where the fast step
covers the variant. The benchmark's time is the case's training, evaluation
included; each record's own `train_time_s` is its share of the training
alone. The records are saved to the results directory and kept for the
claims in test_claims.py. With `--bn-baseline`, a case fails when its numbers
moved from the baseline's (bnsuite.baseline: exactly where the machine and
group are the same, beyond a margin over seeds where not).
"""


def test_training_runs(benchmark, case, study, study_session, check_baseline):
    records = benchmark.pedantic(study_session.run_seeds, args=(case,), rounds=1, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update({
        "bnsuite": "case",  # what bnsuite.report reads this benchmark as
        "case": study.case_name(case),
        "runs": [record.spec.case_id for record in records],
        "profile": study.profile,
        "train_loss": {r.spec.case_id: r.train_losses for r in records},
        "held_out_accuracy": {r.spec.case_id: [e.validation_accuracy if e.validation_accuracy is not None
                                               else e.test_accuracy for e in r.epochs] for r in records},
        "test_accuracy": {r.spec.case_id: r.test_accuracy for r in records},
        "train_time_s": sum(r.train_time_s for r in records),
        "steps_per_run": [r.steps for r in records],
        "diverged_at_epoch": {r.spec.case_id: r.diverged_at_epoch for r in records},
        # --bn-resume: the records were found finished, not trained; the benchmark's time is not a training time.
        "reused": tuple(case) in study_session.reused,
    })
    assert [record.spec for record in records] == list(case)
    for record in records:
        spec = record.spec
        # Steps are counted by the training loop as it runs, so a dropped batch shows here.
        assert record.steps == spec.steps_per_epoch * (record.diverged_at_epoch or spec.epochs)
        assert len(record.epochs) == (record.diverged_at_epoch - 1 if record.diverged else spec.epochs)
        assert record.study == study
        assert record.spec.case_id in record.trained_with
    failed = [comparison.describe() for comparison in check_baseline(records) if comparison.failed]
    assert not failed, "against the baseline: " + "; ".join(failed)
