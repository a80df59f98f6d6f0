"""The claims' verdicts stored as data next to the records (bnsuite.verdicts)."""

import shutil
from pathlib import Path

import pytest

from bnsuite.core.claims import study_claims
from bnsuite.core.records import RUNS_SUBDIR, load_records
from bnsuite.core.report import evaluate_claims
from bnsuite.core.verdicts import VERDICTS_FILE, VerdictsError, load_verdicts, save_verdicts, still_valid

SMOKE = Path(__file__).resolve().parents[1] / "results" / "reference" / "smoke"


@pytest.fixture
def judged(tmp_path):
    """A copy of the smoke reference's batch-study runs at batch 128, and its claims judged on them."""
    runs = tmp_path / RUNS_SUBDIR
    runs.mkdir()
    for path in (SMOKE / RUNS_SUBDIR).glob("*-bs128-seed*.json"):
        if path.name.startswith(("plain-", "bn-bs128")):
            shutil.copy(path, runs)
    records = load_records(tmp_path)
    by_run = {record.spec: record for record in records}
    results = [result for result in evaluate_claims(records, records[0].study) if result.p_value is not None]
    claims = {claim.name: claim for claim in study_claims(records[0].study)}
    return tmp_path, [(result, [by_run[spec].filename for spec in claims[result.name].needs if spec in by_run])
                      for result in results]


def test_stored_verdicts_read_back_equal_and_go_stale_when_a_record_they_judged_changes(judged):
    directory, results = judged
    assert results
    save_verdicts(directory, results)
    stored = load_verdicts(directory)
    assert [verdict.result for verdict in stored] == [result for result, _ in results]
    assert all(still_valid(directory, verdict) for verdict in stored)
    victim = directory / RUNS_SUBDIR / results[0][1][0]
    victim.write_bytes(victim.read_bytes().replace(b'"hostname": "', b'"hostname": "x', 1))
    assert not still_valid(directory, load_verdicts(directory)[0])


def test_a_later_run_keeps_the_verdicts_it_did_not_judge_again(judged):
    directory, results = judged
    save_verdicts(directory, results[:1])
    save_verdicts(directory, results[1:])
    assert sorted(verdict.result.name for verdict in load_verdicts(directory)) == sorted(r.name for r, _ in results)


def test_an_unreadable_verdicts_file_is_one_line_naming_it(tmp_path):
    (tmp_path / VERDICTS_FILE).write_text("{not json")
    with pytest.raises(VerdictsError, match=r"claims.json: cannot read the stored verdicts .*; delete it"):
        load_verdicts(tmp_path)
    (tmp_path / VERDICTS_FILE).write_text('{"schema": 99, "claims": []}')
    with pytest.raises(VerdictsError, match="schema 99 is not 1"):
        load_verdicts(tmp_path)
