"""bnsuite on a multi-node Ray cluster, the path a user who outgrows one machine takes.

The cluster is Ray's own test utility (`ray.cluster_utils.Cluster`) on this
machine: a head node with no CPU (so it schedules, never trains) and two worker
nodes of one CPU each, every node with its own raylet and object store. The
nodes are started with a plugin directory on their PYTHONPATH, as a user
installs a plugin on every node. The smoke batch study (`STUDY`) joins it through
`--bn-ray-address HEAD` and through Ray Client (`ray://...`), a worker node is
removed while it trains a case, a worker process is killed in its task and a task raises, a worker
trains on other data than the driver's, and the plugins reach the workers (joined with
`--bn-ray-address auto`, as on the head node) or fail the case where a node lacks one.

Needs the optional extra: `python3 -m uv run --extra ray pytest tests/ -m ray` (.ci/run runs it so);
skipped without Ray. Run so, every driver descends from `uv run`, the case in which Ray's uv hook (which bnsuite
turns off) had the workers of the plugin study, run from a directory that is no uv project, never start.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnsuite.core import baseline as gate
from bnsuite.core.records import load_records
from bnsuite.executor import ExecutorError, RayExecutor
from bnsuite.study import StudySession, study_from_options
from bnsuite.training.data import load_raw

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray
cluster_utils = pytest.importorskip("ray.cluster_utils")
ROOT = Path(__file__).resolve().parents[1]
NODE = re.compile(r", node ([0-9a-f]{12}) \(")
# The study the cluster trains: the smoke batch study at batch 64 and 128, 2 seeds, 1 epoch (4 cases).
STUDY = dict(batch_sizes="64,128", seeds="0,1", epochs="1")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _readme_plugin() -> str:
    """The plugin of docs/plugins.md (the example the tests run)."""
    from test_plugins import readme_example

    return readme_example("my_norms.py")


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory, mnist_dir):
    """The docs' plugin and its worked example (a package that declares its entry point, with its data), as a user
    installs them on every node of the cluster."""
    from test_plugins import install_worked_example

    directory = tmp_path_factory.mktemp("nodes-site")
    (directory / "my_norms.py").write_text(_readme_plugin())
    return install_worked_example(directory, mnist_dir)


@pytest.fixture(scope="module")
def cluster(plugin_dir):
    """A head without CPUs, with Ray Client's server, and two worker nodes of one CPU each."""
    before = {name: os.environ.get(name) for name in ("PYTHONPATH", "RAY_ENABLE_UV_RUN_RUNTIME_ENV")}
    # What the nodes inherit: the plugin on their path, and Ray's uv hook off, as docs/cluster.md asks of a head
    # started under `uv run` (its Ray Client server would apply the hook to every client's job).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_dir), before["PYTHONPATH"]]))
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    client_port = _free_port()
    try:
        cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "ray_client_server_port": client_port})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    cluster.client_address = f"ray://127.0.0.1:{client_port}"
    yield cluster
    cluster.shutdown()


def _worker_ids(cluster) -> set[str]:
    return {node.node_id[:12] for node in cluster.worker_nodes}


@pytest.fixture(scope="module")
def local_records(tmp_path_factory, mnist_dir):
    """The smoke batch study trained locally with one torch thread, as a Ray task trains (one CPU)."""
    results = tmp_path_factory.mktemp("local")
    study = study_from_options("smoke", studies="batch", **STUDY)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        session = StudySession(study, results_dir=results, data_dir=mnist_dir)
        for group in study.groups():
            session.run_seeds(group)
    finally:
        torch.set_num_threads(before)
    return results


def _study_on(address: str, results: Path, mnist_dir, *extra: str, cwd: Path = ROOT,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """The smoke batch study (another by `extra`), run as a user runs it: pytest with --bn-executor ray
    --bn-ray-address ADDRESS."""
    command = [sys.executable, "-m", "pytest", "--pyargs", "bnsuite.benchmarks.test_study", "-p", "no:cacheprovider",
               "--benchmark-disable", "--bn-profile", "smoke", "--bn-studies", "batch", "--bn-seeds", STUDY["seeds"],
               "--bn-epochs", STUDY["epochs"], "--bn-executor", "ray",
               "--bn-ray-address", address, "--bn-results-dir", str(results), "--bn-data-dir", str(mnist_dir), *extra]
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


# Through the head's address, the whole STUDY; through Ray Client, its batch-128 cases (the client path differs in
# how the driver connects, not in what the workers train).
@pytest.mark.parametrize(("how", "batch_sizes", "cases"), [("address", STUDY["batch_sizes"], 4), ("client", "128", 2)])
def test_the_smoke_study_joins_the_cluster_spreads_over_its_nodes_and_equals_a_local_run(
        how, batch_sizes, cases, cluster, local_records, tmp_path, mnist_dir):
    address = cluster.address if how == "address" else cluster.client_address
    _study_on(address, tmp_path / "results", mnist_dir, "--bn-batch-sizes", batch_sizes)
    records = load_records(tmp_path / "results")
    assert len(records) == 2 * cases  # 2 seeds a case, each record written once, by the driver
    assert {record.executor.split(", node ")[0] for record in records} == {f"ray at {address}"}
    nodes = {NODE.search(record.executor).group(1) for record in records}
    assert len(nodes) == 2 and nodes == _worker_ids(cluster)  # both worker nodes trained; the head never did
    comparisons = gate.compare(records, gate.Baseline.load(local_records))
    assert [(c.rule, c.verdict) for c in comparisons] == [(gate.EXACT, gate.IDENTICAL)] * cases


def test_a_users_plugin_trains_on_the_workers_that_have_it_installed_joined_with_auto(cluster, tmp_path, mnist_dir):
    project = tmp_path / "project"  # the driver imports the plugin from the user's directory, the nodes their own
    project.mkdir()
    (project / "my_norms.py").write_text(_readme_plugin())
    # Joined with "auto", as on the head node: Ray finds the cluster this machine runs.
    _study_on("auto", tmp_path / "results", mnist_dir, "--bn-plugin", "my_norms", "--bn-variants",
              "plain,batch-rms,batch-rms-after-relu", "--bn-batch-sizes", "128", cwd=project)
    records = load_records(tmp_path / "results")
    assert {record.spec.variant for record in records} == {"plain", "batch-rms", "batch-rms-after-relu"}
    assert {record.variant.source.split()[0] for record in records} == {"bnsuite", "my_norms"}
    assert {record.executor.split(", node ")[0] for record in records} == {"ray at auto"}
    assert {NODE.search(record.executor).group(1) for record in records} <= _worker_ids(cluster)


def test_the_worked_example_trains_on_the_nodes_from_its_installed_package_and_its_dataset(
        cluster, plugin_dir, clean_registry, tmp_path, mnist_dir):
    # The driver has the package installed as the nodes do; its entry point registers the study and the dataset.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_dir), os.environ.get("PYTHONPATH")]))}
    _study_on(cluster.address, tmp_path / "results", mnist_dir, "--bn-studies", "residual", "--bn-dataset",
              "my-digits", "--bn-seeds", "0-0", cwd=tmp_path, env=env)
    records = load_records(tmp_path / "results")
    assert len(records) == 3 and {r.spec.dataset for r in records} == {"my-digits"}
    assert {(r.spec.variant, r.variant.source, r.dataset.source) for r in records} == {
        ("plain", "bnsuite", "my_study my-study 0.1"), ("bn", "bnsuite", "my_study my-study 0.1"),
        ("ws", "my_study my-study 0.1", "my_study my-study 0.1")}  # bnsuite's plain and bn on the plugin's network
    assert {(r.spec.network, network.source) for r in records for network in r.study.networks} == {
        ("resmlp", "my_study my-study 0.1")}
    assert {NODE.search(record.executor).group(1) for record in records} <= _worker_ids(cluster)
    assert all(math.isfinite(epoch.measure("block-weight-norm")) for r in records for epoch in r.epochs)


def test_a_plugin_the_workers_cannot_import_fails_the_case_naming_the_module_and_the_node(
        cluster, tmp_path, mnist_dir, monkeypatch):
    driver_only = tmp_path / "driver-site"  # on the driver's path, on no node's
    driver_only.mkdir()
    (driver_only / "driver_only_norms.py").write_text("")
    monkeypatch.syspath_prepend(str(driver_only))
    study = study_from_options("smoke", studies="batch", variants="plain", batch_sizes="128", seeds="1", epochs="1")
    executor = RayExecutor(study, address=cluster.address, data_dir=mnist_dir, plugins=("driver_only_norms",),
                           dataset_checksum=load_raw("mnist", data_dir=mnist_dir).checksum)
    executor.start(study.groups())
    try:
        with pytest.raises(ExecutorError, match=r"failed on its Ray worker: PluginError: on node [0-9a-f]{12} \(.+\): "
                                                r"cannot import the plugin module 'driver_only_norms'"):
            executor.result(study.groups()[0])
    finally:
        executor.stop()


def _smoke_case_study():
    """2 cases (plain, bn at batch 128) of 2 seeds, 1 epoch: one for each of the 2 worker nodes."""
    return study_from_options("smoke", studies="batch", variants="plain,bn", batch_sizes="128", seeds="0,1",
                              epochs="1")


def test_a_killed_worker_is_retried_and_a_raising_task_fails_only_its_own_case(cluster, tmp_path, mnist_dir):
    marker = tmp_path / "killed-once"

    def trainer(specs, **options):
        from bnsuite.training.train import train_seeds

        if specs[0].variant == "plain":
            raise ValueError("planted failure in the plain case")

        def die_once(spec, epoch):
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)  # the worker dies in the middle of its task

        return train_seeds(specs, on_epoch=die_once, **options)

    study = _smoke_case_study()
    executor = RayExecutor(study, address=cluster.address, data_dir=mnist_dir, trainer=trainer,
                           dataset_checksum=load_raw("mnist", data_dir=mnist_dir).checksum)
    executor.start(study.groups())
    try:
        plain, bn = study.groups()
        with pytest.raises(ExecutorError, match=r"case plain-bs128-seed0 and 1 more runs failed on its Ray worker: "
                                                r"ValueError: planted failure in the plain case"):
            executor.result(plain)
        records = executor.result(bn)
    finally:
        executor.stop()
    assert marker.exists()  # a worker was killed, and the retry still delivered every record
    assert [r.spec for r in records] == list(bn) and all(len(r.epochs) == 1 for r in records)


def test_a_dataset_checksum_other_than_the_drivers_fails_the_case(cluster, mnist_dir):
    study = _smoke_case_study()
    executor = RayExecutor(study, address=cluster.address, data_dir=mnist_dir, dataset_checksum="0" * 32)
    executor.start(study.groups()[:1])
    try:
        with pytest.raises(ExecutorError, match=r"trained on a dataset with checksum \w{32}, not the driver's 0{32}"):
            executor.result(study.groups()[0])
    finally:
        executor.stop()


def _stalls_once(marker: Path):
    """A trainer whose first attempt at the bn case records its node in `marker`, then waits for that node to be
    removed; every other attempt trains."""
    def trainer(specs, **options):
        import ray as worker_ray

        from bnsuite.training.train import train_seeds

        if specs[0].variant == "bn" and not marker.exists():
            marker.write_text(worker_ray.get_runtime_context().get_node_id())
            time.sleep(300)
        return train_seeds(specs, **options)

    return trainer


def _remove_the_node_in(marker: Path, cluster) -> str:
    deadline = time.monotonic() + 120
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline, "the bn case never started"
        time.sleep(0.2)
    victim = next(node for node in cluster.worker_nodes if node.node_id == marker.read_text())
    cluster.remove_node(victim)
    cluster.add_node(num_cpus=1)  # the next test finds two worker nodes again
    return victim.node_id


@pytest.mark.parametrize("retries", [3, 0])
def test_a_node_lost_mid_case_is_retried_elsewhere_or_fails_naming_it_and_no_record_is_doubled_or_half_written(
        retries, cluster, tmp_path, mnist_dir):
    marker = tmp_path / "stalled-on"
    study = study_from_options("smoke", studies="batch", batch_sizes="128", seeds="0,1", epochs="1")
    executor = RayExecutor(study, address=cluster.address, data_dir=mnist_dir, trainer=_stalls_once(marker),
                           retries=retries, dataset_checksum=load_raw("mnist", data_dir=mnist_dir).checksum)
    executor.start(study.groups())
    session = StudySession(study, results_dir=tmp_path / "results", executor=executor)
    plain, bn = study.groups()
    try:
        lost = _remove_the_node_in(marker, cluster)
        session.run_seeds(plain)
        if retries:
            records = session.run_seeds(bn)
            assert {NODE.search(record.executor).group(1) for record in records} != {lost[:12]}  # trained elsewhere
        else:
            with pytest.raises(ExecutorError, match=rf"case bn-bs128-seed0 and 1 more runs was lost by Ray after 0 "
                                                    rf"retries: NodeDiedError: .*node ID: {lost}"):
                session.run_seeds(bn)
    finally:
        executor.stop()
    saved = sorted(record.spec.case_id for record in load_records(tmp_path / "results"))
    expected = ["bn-bs128-seed0", "bn-bs128-seed1"] if retries else []
    assert saved == sorted(["plain-bs128-seed0", "plain-bs128-seed1", *expected])  # each once, none half-written
    assert not list((tmp_path / "results" / "runs").glob("*.partial"))
