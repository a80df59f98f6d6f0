"""The tools that read records, at scale: loading, the report and the baseline comparison over a thousand records.

A study with many seeds writes thousands of records, and the report, the claims and both baseline commands read
them all. The records here are made from the committed smoke reference's: every study of the smoke profile, on
both networks, with 21 seeds instead of 3 (1,071 runs), every record a valid one of that study, each run's numbers
those of the reference's seed-0 run of the same configuration. Times are taken once each, in one round.
"""

import dataclasses
import time
from pathlib import Path

from bnsuite.core import baseline, report
from bnsuite.core.records import load_records, save_record
from bnsuite.study import study_from_options

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "smoke"
SEEDS = 21  # the smoke profile's every study on both networks: 1,071 records


def _thousand_records(directory: Path) -> int:
    """Valid records of the smoke profile's every study on both networks with SEEDS seeds, written to `directory`;
    returns how many."""
    study = study_from_options("smoke", studies="all", network="mlp,cnn", seeds=f"0-{SEEDS - 1}")
    templates = {dataclasses.replace(record.spec, seed=0): record for record in load_records(REFERENCE)
                 if record.spec.seed == 0}
    count = 0
    for case in study.groups():
        recorded = study.recorded_study(case)
        for spec in case:
            template = templates[dataclasses.replace(spec, seed=0)]
            save_record(dataclasses.replace(template, spec=spec, study=recorded, runs_trained_together=len(case),
                                            variant=recorded.variant(spec.variant, spec.network),
                                            trained_with=tuple(run.case_id for run in case)), directory)
            count += 1
    return count


def test_loading_the_report_and_compare_over_a_thousand_records(benchmark, tmp_path):
    results = tmp_path / "results"
    written = _thousand_records(results)
    times: dict[str, float] = {}

    def read_them_all():
        started = time.perf_counter()
        records = load_records(results)
        times["load"] = time.perf_counter() - started
        started = time.perf_counter()
        report.build_report(results, out=tmp_path / "REPORT.md", with_plots=False)
        times["report"] = time.perf_counter() - started
        started = time.perf_counter()
        against = baseline.Baseline.load(results)
        compared = baseline.compare(records, against)
        times["compare"] = time.perf_counter() - started
        return records, compared

    records, compared = benchmark.pedantic(read_them_all, rounds=1, iterations=1)
    assert len(records) == written > 1_000 and compared
    benchmark.extra_info.update({"bnsuite": "tools", "records": written, "seconds": times})
