"""Where a study's cases train: in the pytest process (`local`), in worker processes on this machine
(`processes`), or as tasks on a Ray cluster (`ray`).

Under `processes`, a pool of worker processes (concurrent.futures, one per
CPU by default) trains the cases one thread each, every case submitted when
the session starts, the longest first. The study's small matmuls and its
non-matmul work gain less from a second thread than a second case gains
from a second process. Records, faults and Ctrl-C behave as under Ray, on
this machine only.

Under `ray`, each case (a group of runs that train together) is one Ray
task, and every task is submitted when the session starts, so the cases run
in parallel on as many CPUs as the instance or cluster has; each benchmark
test then waits for its own case. Ray is the engine machine-learning sweeps
already run on (Ray Tune is built on it); bnsuite adds no scheduler of its
own. Only the driver writes records (atomically, as locally), so workers
never need the results directory; they read the dataset from their own
cache or the offline source, and a record whose dataset checksum differs
from the driver's fails its case. Faults: a worker that dies is retried by
Ray (`max_retries`); a task that raises fails its own case with the worker's
message while the others go on; an interrupted session cancels what is
still running and hands back the records of the cases already finished.

Ray is an optional extra (`uv run --extra ray ...`): nothing here imports it
until a Ray executor starts.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bnsuite.core.records import RunRecord
from bnsuite.core.registry import PluginError, load_plugins
from bnsuite.core.spec import RunSpec, StudySpec
from bnsuite.training.environment import GIT_COMMIT_VARIABLE, git_commit

EXECUTORS = ("local", "processes", "ray")
RETRIES = 3  # Ray's retries of a task whose worker died (a task that raises is not retried)
CLIENT_ATTEMPTS = 3  # tries to join through Ray Client whose server failed to start this connection's own server
Group = tuple[RunSpec, ...]
Trainer = Callable[..., list[RunRecord]]


class ExecutorError(RuntimeError):
    """A case could not be trained by the executor: the message says which and why (the worker's own words)."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise ExecutorError("--bn-executor ray needs Ray, an optional extra: run with "
                            "`python3 -m uv run --extra ray pytest benchmarks/ --bn-executor ray`") from None
    return ray


def _train_case(specs: Sequence[RunSpec], data_dir: str | None, study: StudySpec | None, executor: str,
                trainer: Trainer | None, plugins: tuple[str, ...] = ()) -> list[RunRecord]:
    """The body of a Ray task: import the driver's plugins, train one case on the worker, return its records (the
    driver saves them)."""
    node = this_node()
    try:
        load_plugins(plugins, entry_points=False)  # the driver's, entry points included: exactly those
    except PluginError as error:
        raise PluginError(f"on {node}: {error}") from None
    if trainer is None:
        from bnsuite.training.train import train_seeds as trainer
    return trainer(tuple(specs), data_dir=data_dir, study=study, executor=f"{executor}, {node}")


def this_node() -> str:
    """The Ray node a task runs on, as its records name it: `node ID (IP, host NAME)`, the ID's first 12 hex
    digits as `ray status` and the dashboard show them."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return f"node {node_id[:12]} ({ray.util.get_node_ip_address()}, host {platform.node()})"


def join(ray, address: str, *, attempts: int = CLIENT_ATTEMPTS, pause_s: float = 1.0, **options) -> None:
    """`ray.init(address=address, **options)`, tried again where the address is Ray Client's (`ray://`) and its
    server could not start the server of this connection (ConnectionAbortedError).

    Ray Client's proxy starts one server process per connection; on a busy machine that process can die as it
    starts (the proxy logs "SpecificServer startup failed", its own log is empty), and a second connection then
    works. A failed connection has already disconnected itself, so a new `ray.init` is a clean try.
    """
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, **options)
            return
        except ConnectionAbortedError as error:
            if not address.startswith("ray://"):
                raise
            if attempt == attempts:
                raise ExecutorError(f"could not join the Ray cluster at {address}: Ray Client's server failed to "
                                    f"start this connection's server {attempts} times ({error}); see the head "
                                    "node's ray_client_server*.err logs (/tmp/ray/session_latest/logs)") from None
            print(f"bnsuite: Ray Client at {address} failed to start this connection's server; trying again "
                  f"({attempt + 1} of {attempts})", file=sys.stderr, flush=True)
            time.sleep(pause_s)


class RayExecutor:
    """Runs every case of a study as a Ray task; one instance per pytest session, driven by the plugin.

    `address`: None starts a local Ray instance on this machine (`cpus` CPUs, all of them by default); "auto"
    or "ray://host:port" joins a running cluster. `plugins`: the plugin modules every task imports before it
    trains (the driver's, as bnsuite.registry.load_plugins returned them); on a local instance the workers also
    get the directories of those that are plain files on the driver's path. `trainer` replaces
    bnsuite.train.train_seeds in the tasks (the tests use it to make a task fail or its worker die).
    """

    def __init__(self, study: StudySpec, *, address: str | None = None, data_dir: Path | str | None = None,
                 dataset_checksum: str, cpus: int | None = None, trainer: Trainer | None = None,
                 retries: int = RETRIES, plugins: Sequence[str] = ()):
        self.study = study
        self.address = address
        self.data_dir = str(data_dir) if data_dir is not None else None
        self.dataset_checksum = dataset_checksum
        self.cpus = cpus
        self.trainer = trainer
        self.retries = retries
        self.plugins = tuple(plugins)
        self.pending: dict[Group, object] = {}  # case -> its task's ObjectRef, until the case's test claims it
        self.ray = None
        self.task = None

    @property
    def name(self) -> str:
        return f"ray at {self.address or 'a local instance'}"

    def start(self, groups: Sequence[Group]) -> None:
        """Start or join Ray and submit every case; returns at once, the tasks run in the background."""
        ray = self.ray = import_ray()
        env_vars = {GIT_COMMIT_VARIABLE: git_commit() or ""}
        if self.address is None:
            paths = _plugin_paths(self.plugins)
            if paths:  # the workers of a local instance import the same plugin files as the driver
                env_vars["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
        # Workers run the environment their node runs: a local instance's, this interpreter's. Ray's uv hook would
        # instead have them rebuild the driver's `uv run` command line in a copy of the driver's directory when any
        # ancestor of the driver is `uv run`: without the ray extra (`uv run pytest tests/` after an earlier
        # `--extra ray`), or from a directory that is no uv project (a user's own, with bnsuite installed), their
        # workers never start and the study waits forever. RAY_ENABLE_UV_RUN_RUNTIME_ENV=1 asks for the hook.
        from ray._private import ray_constants

        wanted = os.environ.get("RAY_ENABLE_UV_RUN_RUNTIME_ENV") == "1"
        uv_hook, ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV, wanted
        try:
            if self.address is None:
                # "local": a new instance of our own, even where a cluster started on this machine is running.
                ray.init(address="local", num_cpus=self.cpus or os.cpu_count(), include_dashboard=False,
                         log_to_driver=False, runtime_env={"env_vars": env_vars})
            else:
                join(ray, self.address, log_to_driver=False, runtime_env={"env_vars": env_vars})
        finally:
            ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = uv_hook
        # One CPU per case: Ray then sets the worker's OMP_NUM_THREADS, hence torch's threads, to 1.
        self.task = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=False)(_train_case)
        self.submit(groups)

    def result(self, group: Group) -> list[RunRecord]:
        """The case's records, waiting for its task (submitting it first if the session did not)."""
        if group not in self.pending:
            self.submit([group])
        reference = self.pending.pop(group)
        try:
            records = self.ray.get(reference)
        except self.ray.exceptions.RayTaskError as error:
            cause = error.cause if getattr(error, "cause", None) is not None else error
            raise ExecutorError(f"case {_case(group)} failed on its Ray worker: {type(cause).__name__}: "
                                f"{cause}") from None
        except self.ray.exceptions.RayError as error:
            raise ExecutorError(f"case {_case(group)} was lost by Ray after {self.retries} retries: "
                                f"{type(error).__name__}: {error}") from None
        self._check_dataset(group, records)
        return records

    def submit(self, groups: Sequence[Group]) -> None:
        for group in groups:
            self.pending[group] = self.task.remote(group, self.data_dir, self.study.recorded_study(group), self.name,
                                                   self.trainer, self.plugins)

    def _check_dataset(self, group: Group, records: list[RunRecord]) -> None:
        for record in records:
            if record.environment.dataset_checksum != self.dataset_checksum:
                raise ExecutorError(
                    f"case {_case(group)}: its worker ({record.environment.hostname}) trained on a dataset with "
                    f"checksum {record.environment.dataset_checksum}, not the driver's {self.dataset_checksum}; "
                    "give every node the same verified dataset (docs/cluster.md, Setting up a cluster)")

    def stop(self, *, interrupted: bool = False) -> list[RunRecord]:
        """Shut Ray down. Interrupted: cancel the cases still running and return the finished cases' records."""
        if self.ray is None:
            return []
        finished: list[RunRecord] = []
        try:
            if interrupted and self.pending:
                references = list(self.pending.values())
                ready, running = self.ray.wait(references, num_returns=len(references), timeout=0)
                for reference in running:
                    self.ray.cancel(reference, force=True)
                for group, reference in list(self.pending.items()):
                    if reference in ready:
                        try:
                            records = self.ray.get(reference)
                            self._check_dataset(group, records)
                            finished += records
                        except (self.ray.exceptions.RayError, ExecutorError):
                            pass  # a failed case has no records to keep
            self.pending.clear()
        finally:
            self.ray.shutdown()
            self.ray = None
        return finished


def _plugin_paths(plugins: Sequence[str]) -> list[str]:
    """The directories the driver imported its plugin modules from, outside any installed package."""
    paths = []
    for name in plugins:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            root = Path(path).resolve().parents[name.count(".")]
            if "site-packages" not in root.parts and str(root) not in paths:
                paths.append(str(root))
    return paths


def _case(group: Group) -> str:
    return group[0].case_id if len(group) == 1 else f"{group[0].case_id} and {len(group) - 1} more runs"


def _start_process_worker(commit: str) -> None:
    """A pool worker's start: one thread (set before torch's pool starts, so it never has more), and the driver's
    commit for the records (a spawned worker has the driver's sys.path, so it imports what the driver imports)."""
    os.environ[GIT_COMMIT_VARIABLE] = commit
    import torch

    torch.set_num_threads(1)
    import bnsuite.training.train  # noqa: F401  (flushes subnormals before this worker computes anything)


def _train_in_process(specs: Sequence[RunSpec], data_dir: str | None, study: StudySpec | None, executor: str,
                      plugins: tuple[str, ...]) -> list[RunRecord]:
    """The body of a worker's case: import the driver's plugins (once per worker; a module that fails fails the
    case, naming it), train, return the records (the driver saves them)."""
    from bnsuite.training.train import train_seeds

    load_plugins(plugins, entry_points=False)
    return train_seeds(tuple(specs), data_dir=data_dir, study=study, executor=f"{executor}, pid {os.getpid()}")


def case_cost(group: Group) -> int:
    """A case's training work, for scheduling: the images its runs train on over all their epochs (the
    built-in networks cost about the same per image)."""
    return sum(spec.train_size * spec.epochs for spec in group)


class ProcessExecutor:
    """Runs every case in a pool of worker processes on this machine, one thread each; one instance per pytest
    session, driven by the plugin as a RayExecutor is. `workers`: how many (default: the CPUs this process may
    run on). Workers start by spawning, import the driver's plugins (`plugins`, as bnsuite.registry.load_plugins
    returned them), and read the dataset as the driver did."""

    def __init__(self, study: StudySpec, *, data_dir: Path | str | None = None, dataset_checksum: str,
                 workers: int | None = None, plugins: Sequence[str] = ()):
        self.study = study
        self.data_dir = str(data_dir) if data_dir is not None else None
        self.dataset_checksum = dataset_checksum
        self.workers = workers or len(os.sched_getaffinity(0))
        self.plugins = tuple(plugins)
        self.pending: dict[Group, concurrent.futures.Future] = {}
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    @property
    def name(self) -> str:
        return f"processes ({self.workers} workers, 1 thread each)"

    def start(self, groups: Sequence[Group]) -> None:
        """Start the pool and submit every case, the longest first (so no worker is left with a long case at the
        end while the others idle); returns at once."""
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_process_worker,
            initargs=(git_commit() or "",))
        self.submit(sorted(groups, key=case_cost, reverse=True))

    def submit(self, groups: Sequence[Group]) -> None:
        for group in groups:
            self.pending[group] = self.pool.submit(_train_in_process, group, self.data_dir,
                                                   self.study.recorded_study(group), self.name, self.plugins)

    def result(self, group: Group) -> list[RunRecord]:
        """The case's records, waiting for its worker (submitting the case first if the session did not)."""
        if group not in self.pending:
            self.submit([group])
        future = self.pending.pop(group)
        try:
            records = future.result()
        except concurrent.futures.process.BrokenProcessPool as error:
            raise ExecutorError(f"case {_case(group)}: a worker process died ({error}); the pool cannot go on, "
                                "run the study again (or with --bn-executor local to see the failure here)") from None
        except Exception as error:  # the worker's own exception, re-raised here by concurrent.futures
            raise ExecutorError(f"case {_case(group)} failed in its worker process: {type(error).__name__}: "
                                f"{error}") from None
        for record in records:
            if record.environment.dataset_checksum != self.dataset_checksum:
                raise ExecutorError(f"case {_case(group)}: its worker trained on a dataset with checksum "
                                    f"{record.environment.dataset_checksum}, not the driver's {self.dataset_checksum}")
        return records

    def stop(self, *, interrupted: bool = False) -> list[RunRecord]:
        """Shut the pool down. Interrupted: stop the cases still running (their workers are killed) and return the
        finished cases' records."""
        if self.pool is None:
            return []
        finished: list[RunRecord] = []
        if interrupted:
            for future in self.pending.values():
                if future.done() and not future.cancelled() and future.exception() is None:
                    finished += future.result()
            for process in list(getattr(self.pool, "_processes", {}).values()):
                process.kill()  # a running case has nothing to keep; concurrent.futures cannot cancel it
        self.pending.clear()
        self.pool.shutdown(wait=not interrupted, cancel_futures=True)
        self.pool = None
        return finished
