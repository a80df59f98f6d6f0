"""The study's matrix: one case per variant and batch size, timed by pytest-benchmark.

A case trains every seed of its variant and batch size once, as one batched
computation (one round, one iteration, no warm-up run), so the benchmark's
time is those runs' training, evaluation included; each record's own
`train_time_s` is its share of the training alone. The records are saved to
the results directory and kept for the claims in test_claims.py.
"""


def test_training_runs(benchmark, seed_group, study, study_session):
    records = benchmark.pedantic(study_session.run_seeds, args=(seed_group,), rounds=1, iterations=1,
                                 warmup_rounds=0)
    by_seed = {record.spec.seed: record for record in records}
    first = seed_group[0]
    benchmark.extra_info.update({
        "bnsuite": "case",  # what bnsuite.report reads this benchmark as
        "case": f"{first.variant}-bs{first.batch_size}",
        "runs": [record.spec.case_id for record in records],
        "profile": study.profile,
        "seeds": list(by_seed),
        "train_loss": {seed: r.train_losses for seed, r in by_seed.items()},
        "validation_accuracy": {seed: [e.validation_accuracy for e in r.epochs] for seed, r in by_seed.items()},
        "test_accuracy": {seed: r.test_accuracy for seed, r in by_seed.items()},
        "train_time_s": sum(r.train_time_s for r in records),
        "steps_per_run": [r.steps for r in records],
        "target_loss": study.claims.target_loss,
        "epochs_to_target": {seed: r.epochs_to_target(study.claims.target_loss) for seed, r in by_seed.items()},
        "diverged_at_epoch": {seed: r.diverged_at_epoch for seed, r in by_seed.items()},
    })
    assert [record.spec for record in records] == list(seed_group)
    for record in records:
        spec = record.spec
        # Steps are counted by the training loop as it runs, so a dropped batch shows here.
        assert record.steps == spec.steps_per_epoch * (record.diverged_at_epoch or spec.epochs)
        assert len(record.epochs) == (record.diverged_at_epoch - 1 if record.diverged else spec.epochs)
        assert record.group_seeds == tuple(s.seed for s in seed_group)
        assert record.study == study
