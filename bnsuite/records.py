"""RunRecord: what one training run did, as JSON on disk and as pandas tables.

A record carries its own context (the spec, the environment, the dataset
checksum, the commit), so a table built from records never has to guess how
a number was made. Records are written atomically: a crash, a kill or a
concurrent writer leaves either no file or a complete one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

from bnsuite.files import write_atomically
from bnsuite.spec import RunSpec, SpecError

SCHEMA_VERSION = 1
RUNS_SUBDIR = "runs"


class RecordError(ValueError):
    """A record file is malformed or of a schema this version cannot read."""


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float  # mean of the per-batch losses, as the study prints it
    train_accuracy: float  # percent, over the epoch's training batches (train mode)
    validation_loss: float | None  # None under the seed protocol (no validation split)
    validation_accuracy: float | None
    test_loss: float
    test_accuracy: float
    epoch_time_s: float  # training only, evaluation excluded; a share when runs train together


@dataclass(frozen=True)
class Environment:
    torch_version: str
    device: str
    device_name: str
    threads: int
    python_version: str
    platform: str
    git_commit: str | None
    dataset_checksum: str


@dataclass(frozen=True)
class RunRecord:
    spec: RunSpec
    epochs: tuple[EpochRecord, ...]
    test_loss: float | None
    test_accuracy: float
    train_time_s: float  # sum of epoch times: training only, evaluation excluded
    steps: int  # optimizer steps taken
    diverged_at_epoch: int | None  # first epoch whose loss blew up; the run stopped there
    environment: Environment
    started_at: str
    profile: str | None = None  # the benchmark profile that made it, if any
    # Runs (this one included) trained as one batched computation; times are this run's share of it.
    runs_trained_together: int = 1
    schema_version: int = SCHEMA_VERSION

    @property
    def diverged(self) -> bool:
        return self.diverged_at_epoch is not None

    @property
    def train_losses(self) -> list[float]:
        return [epoch.train_loss for epoch in self.epochs]

    @property
    def final_train_loss(self) -> float:
        return self.epochs[-1].train_loss if self.epochs and not self.diverged else math.inf

    def epochs_to_target(self, target_loss: float) -> int | None:
        """The first epoch whose mean training loss is at or below `target_loss`, or None."""
        return next((epoch.epoch for epoch in self.epochs if epoch.train_loss <= target_loss), None)

    @property
    def filename(self) -> str:
        return f"{self.spec.case_id}-{self.spec.fingerprint}.json"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, *, source: str = "record") -> "RunRecord":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecordError(f"{source}: not valid JSON ({error}); delete it or re-run that case") from error
        if not isinstance(raw, dict):
            raise RecordError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise RecordError(
                f"{source}: schema version {version!r} is not supported (this bnsuite reads version "
                f"{SCHEMA_VERSION}); re-run the study with this version or use the bnsuite that wrote it"
            )
        try:
            return cls(
                spec=RunSpec(**raw["spec"]),
                epochs=tuple(EpochRecord(**epoch) for epoch in raw["epochs"]),
                environment=Environment(**raw["environment"]),
                **{key: raw[key] for key in _SCALAR_FIELDS},
                runs_trained_together=raw.get("runs_trained_together", 1),  # absent from older records
            )
        except (KeyError, TypeError, SpecError) as error:
            raise RecordError(f"{source}: malformed record ({type(error).__name__}: {error})") from error


_SCALAR_FIELDS = (
    "test_loss", "test_accuracy", "train_time_s", "steps", "diverged_at_epoch",
    "started_at", "profile", "schema_version",
)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a diverged run's non-finite loss is stored as null."""
    return value if math.isfinite(value) else None


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def describe_environment(device: torch.device, dataset_checksum: str) -> Environment:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return Environment(
        torch_version=torch.__version__,
        device=str(device),
        device_name=device_name,
        threads=torch.get_num_threads(),
        python_version=platform.python_version(),
        platform=platform.platform(),
        git_commit=git_commit(),
        dataset_checksum=dataset_checksum,
    )


def git_commit() -> str | None:
    """The commit of the bnsuite checkout, `+dirty` if its code has local changes; None outside git.

    Changes under `results/` do not count: a study rewrites the committed
    reference records there as it runs, and that says nothing about the code.
    """
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results"],
            cwd=here, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def save_record(record: RunRecord, results_dir: Path | str) -> Path:
    """Write `record` into `<results_dir>/runs/`, atomically; returns its path."""
    path = Path(results_dir) / RUNS_SUBDIR / record.filename
    try:
        write_atomically(path, record.to_json().encode())
    except OSError as error:
        raise OSError(
            f"cannot write the record to {path.parent} ({error.strerror or error}); "
            "choose a writable results directory with --bn-results-dir"
        ) from error
    return path


def load_records(results_dir: Path | str) -> list[RunRecord]:
    """Every record under `<results_dir>/runs/`, sorted by case; a malformed file raises RecordError."""
    runs = Path(results_dir) / RUNS_SUBDIR
    if not runs.is_dir():
        raise FileNotFoundError(
            f"no results in {results_dir}: {runs} does not exist. Run the study first: pytest benchmarks/"
        )
    records = [RunRecord.from_json(path.read_text(), source=str(path)) for path in sorted(runs.glob("*.json"))]
    if not records:
        raise FileNotFoundError(f"no records in {runs}. Run the study first: pytest benchmarks/")
    return sorted(records, key=lambda r: (r.spec.dataset, r.spec.variant, r.spec.batch_size, r.spec.seed))


def runs_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run: its spec, final metrics, timing and environment."""
    rows = []
    for record in records:
        last = record.epochs[-1] if record.epochs else None
        rows.append({
            "case": record.spec.case_id,
            **dataclasses.asdict(record.spec),
            "profile": record.profile,
            "epochs_run": len(record.epochs),
            "final_train_loss": last.train_loss if last else None,
            "final_train_accuracy": last.train_accuracy if last else None,
            "final_validation_loss": last.validation_loss if last else None,
            "final_validation_accuracy": last.validation_accuracy if last else None,
            "test_loss": record.test_loss,
            "test_accuracy": record.test_accuracy,
            "train_time_s": record.train_time_s,
            "runs_trained_together": record.runs_trained_together,
            "steps": record.steps,
            "samples_per_s": record.spec.train_size * len(record.epochs) / record.train_time_s
            if record.train_time_s > 0 else None,
            "diverged": record.diverged,
            "diverged_at_epoch": record.diverged_at_epoch,
            **{f"env_{key}": value for key, value in dataclasses.asdict(record.environment).items()},
            "started_at": record.started_at,
        })
    return pd.DataFrame(rows)


def epochs_frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run and epoch: the trajectories."""
    rows = [
        {"case": record.spec.case_id, "variant": record.spec.variant, "batch_size": record.spec.batch_size,
         "seed": record.spec.seed, "dataset": record.spec.dataset, **dataclasses.asdict(epoch)}
        for record in records
        for epoch in record.epochs
    ]
    return pd.DataFrame(rows)

