"""The claims' verdicts as data, next to the records they judged: results/PROFILE/claims.json.

A study run judges its claims with the code of the studies that define them, which may live in a user's plugin. The
report reads records only, so without that plugin a study's claims could not be shown. The pytest plugin therefore
writes every verdict it judged (statement, rule, evidence, p, effect and interval, Holm's verdict over the run's
family) with the record files each claim judged and the SHA-256 of each. The report shows a stored verdict for a
study not registered where it runs, and only while every record it judged is byte for byte the one it judged: a
record written over since (a rerun, a changed record) makes that verdict stale, and the report says so rather than
show it. Torch-free, as the report is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from bnsuite.core.claims import ClaimResult
from bnsuite.core.files import write_atomically
from bnsuite.core.records import RUNS_SUBDIR

VERDICTS_FILE = "claims.json"
VERDICTS_SCHEMA = 1
_RESULTS = TypeAdapter(list[ClaimResult])


class VerdictsError(ValueError):
    """The stored verdicts cannot be read: one line naming the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class StoredVerdict:
    result: ClaimResult
    judged: dict[str, str]  # record file name (under runs/) -> its SHA-256 when the claim was judged


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def save_verdicts(results_dir: Path | str, judged: list[tuple[ClaimResult, list[str]]]) -> Path:
    """Write `judged` ((result, the file names of the records it judged), Holm already applied) into
    `results_dir`/claims.json, keeping the verdicts stored before for claims not judged now; written atomically
    (bnsuite.files), never half-written."""
    directory = Path(results_dir)
    runs = directory / RUNS_SUBDIR
    kept = {verdict.result.name: verdict for verdict in load_verdicts(directory, missing_ok=True)}
    for result, files in judged:
        kept[result.name] = StoredVerdict(result, {name: _digest(runs / name) or "" for name in files})
    data = {"schema": VERDICTS_SCHEMA,
            "claims": [{"result": dataclasses.asdict(verdict.result), "judged": verdict.judged}
                       for verdict in kept.values()]}
    write_atomically(directory / VERDICTS_FILE, json.dumps(data, indent=1).encode())
    return directory / VERDICTS_FILE


def load_verdicts(results_dir: Path | str, *, missing_ok: bool = True) -> list[StoredVerdict]:
    """The verdicts stored in `results_dir` (none if there is no claims.json and `missing_ok`); VerdictsError, one
    line naming the file, if it cannot be read."""
    path = Path(results_dir) / VERDICTS_FILE
    if not path.exists():
        if missing_ok:
            return []
        raise VerdictsError(f"{path}: no stored verdicts; a study run with bnsuite's pytest plugin writes them")
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != VERDICTS_SCHEMA:
            raise VerdictsError(f"{path}: schema {data.get('schema')!r} is not {VERDICTS_SCHEMA}; run the study "
                                "again with this bnsuite, or delete the file")
        results = _RESULTS.validate_python([entry["result"] for entry in data["claims"]])
        return [StoredVerdict(result, dict(entry["judged"]))
                for result, entry in zip(results, data["claims"], strict=True)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ValidationError) as error:
        if isinstance(error, VerdictsError):
            raise
        raise VerdictsError(f"{path}: cannot read the stored verdicts ({str(error).splitlines()[0]}); delete it "
                            "and run the study's claims again") from None


def still_valid(results_dir: Path | str, verdict: StoredVerdict) -> bool:
    """Whether every record `verdict` judged is still, byte for byte, the one it judged."""
    runs = Path(results_dir) / RUNS_SUBDIR
    return bool(verdict.judged) and all(_digest(runs / name) == digest for name, digest in verdict.judged.items())
