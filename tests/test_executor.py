"""Cases as Ray tasks (--bn-executor ray) on a local instance: the same records as locally, Ctrl-C, and a user's
plugin on the workers (the faults a cluster has are tests/test_cluster.py's, on its multi-node cluster).

Needs the optional extra: `python3 -m uv run --extra ray pytest tests/ -m ray` (.ci/run runs it so);
skipped without Ray. Each test starts its own local Ray instance of 2 CPUs (about 8 s) and stops it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnsuite.core import baseline as gate
from bnsuite.core.records import load_records
from bnsuite.executor import RayExecutor
from bnsuite.training.data import load_raw
from conftest import one_thread_local_records, records_through, smoke_batch_study

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def _executor(study, mnist_dir, **options) -> RayExecutor:
    return RayExecutor(study, data_dir=mnist_dir, dataset_checksum=load_raw("mnist", data_dir=mnist_dir).checksum,
                       cpus=2, **options)


def test_a_smoke_study_on_two_ray_workers_gives_the_records_the_local_executor_gives(tmp_path, mnist_dir):
    study = smoke_batch_study()  # 2 cases (plain, bn at batch 128) of 2 seeds: one for each of the 2 workers
    ray_records = records_through(_executor(study, mnist_dir), study, tmp_path / "ray")
    assert {r.executor.split(", node ")[0] for r in ray_records} == {"ray at a local instance"}
    assert all(re.fullmatch(r"ray at a local instance, node [0-9a-f]{12} \(.+, host .+\)", r.executor)
               for r in ray_records)
    # A Ray task has one CPU, so one torch thread: the local run that is the same environment has one too.
    one_thread_local_records(study, tmp_path / "local", mnist_dir)
    comparisons = gate.compare(ray_records, gate.Baseline.load(tmp_path / "local"))
    assert [(c.rule, c.verdict) for c in comparisons] == [(gate.EXACT, gate.IDENTICAL)] * 2
    assert len(load_records(tmp_path / "ray")) == 4  # the driver wrote every record


def test_ctrl_c_cancels_the_running_tasks_and_keeps_the_finished_records(tmp_path, mnist_dir):
    """A real pytest run of the plugin, interrupted with SIGINT once a quick case has finished on its worker."""
    results = tmp_path / "results"
    command = [sys.executable, "-m", "pytest", "benchmarks/test_study.py", "-p", "no:cacheprovider", "-s",
               "--bn-profile", "smoke", "--bn-studies", "batch", "--bn-variants", "plain,bn",
               "--bn-batch-sizes", "128,2", "--bn-seeds", "0-0", "--bn-epochs", "120", "--bn-executor", "ray",
               "--bn-results-dir", str(results), "--bn-data-dir", str(mnist_dir)]
    # 2 CPUs: the cases start in the order the session claims them, plain-bs128 and bn-bs128 (3,840 steps, seconds),
    # then plain-bs2 and bn-bs2 (240,000 steps, 20 to 40 s on the fused step), which are running when the signal
    # comes. Unbuffered: the driver's progress lines must reach the test as they are printed, not when a later
    # case's lines push them out of a pipe's buffer (by then the batch-2 cases could be done).
    # SIGINT as a terminal delivers it: a shell starts a background job with SIGINT ignored, which its children
    # inherit and Python then keeps (no KeyboardInterrupt), so a CI script run in the background would never stop.
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        output = []
        waiting = {"plain-bs128-seed0 epoch 120/120", "bn-bs128-seed0 epoch 120/120"}
        deadline = time.monotonic() + 300
        for line in process.stdout:
            output.append(line)
            waiting = {marker for marker in waiting if marker not in line}
            if not waiting or time.monotonic() > deadline:
                break
        # Both quick cases printed their last epoch; give the last one a moment to return its record to Ray.
        time.sleep(5)
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = "".join(output) + rest
    assert process.returncode == pytest.ExitCode.INTERRUPTED, text
    assert "Ray tasks cancelled" in text
    saved = {record.spec.case_id for record in load_records(results)}
    assert {"plain-bs128-seed0", "bn-bs128-seed0"} <= saved  # finished cases kept
    assert "plain-bs2-seed0" not in saved and "bn-bs2-seed0" not in saved  # cancelled, never half-written


def test_a_users_plugin_variant_trains_on_ray_workers_that_import_the_drivers_plugin(tmp_path, mnist_dir):
    """docs/plugins.md's plugin and study example, named by --bn-plugin from the user's own directory: the workers
    import them too."""
    from test_plugins import readme_example

    project = tmp_path / "project"
    project.mkdir()
    (project / "my_norms.py").write_text(readme_example("my_norms.py"))
    (project / "placement_study.py").write_text(readme_example("placement_study.py"))
    results = tmp_path / "results"
    command = [sys.executable, "-m", "pytest", "--pyargs", "bnsuite.benchmarks.test_study", "-p", "no:cacheprovider",
               "--bn-plugin", "my_norms,placement_study", "--bn-profile", "smoke", "--bn-studies",
               "batch,rms-placement", "--bn-variants", "plain,batch-rms-after-relu,batch-rms", "--bn-batch-sizes",
               "128", "--bn-seeds", "0,1", "--bn-epochs", "1",
               "--bn-executor", "ray", "--bn-results-dir", str(results), "--bn-data-dir", str(mnist_dir)]
    run = subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = load_records(results)
    assert {record.spec.variant for record in records} == {"plain", "batch-rms-after-relu", "batch-rms", "bn"}
    assert {study.name for study in records[0].study.studies} == {"batch", "rms-placement"}
    assert {record.executor.split(", node ")[0] for record in records} == {"ray at a local instance"}
    assert {record.variant.source.split()[0] for record in records} == {"bnsuite", "my_norms"}
