"""Executors of a sweep's plan: a local process pool (the default), Ray, and this process (the demo's).

The planner (``rkd_engine.training.sweep``) decides which runs there are, which teacher each student
needs, what is already finished, and writes ``runs.csv``; an executor only runs jobs. Its interface:

- ``describe()``: a few words for the progress line;
- ``start(root)``: get ready to run jobs of the sweep in the (absolute) directory ``root``;
- ``submit(job, after=teacher_id)``: run ``job`` once the job ``after`` (already submitted) has finished;
  if ``after`` fails, ``job`` fails with "not run: its teacher ... failed" without running;
- ``wait(timeout)``: the ``Outcome`` of every job finished since the last call (waits up to ``timeout``
  seconds for one);
- ``close(cancel=...)``: release the workers; with ``cancel`` stop every run now (as a kill would: the
  runs keep their last checkpoint and resume next time).

Both executors run ``sweep.execute_job`` for each job, which never raises for a failed run.
"""

from __future__ import annotations

import collections
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from rkd_engine.training.config import ConfigError
from rkd_engine.training.sweep import Job, Outcome, SweepSpec, default_workers, execute_job

_STOP_SECONDS = 3.0  # how long a worker gets to exit after SIGTERM before SIGKILL


class Executor(Protocol):
    """What runs the jobs of a sweep (see the module docstring)."""

    def describe(self) -> str: ...

    def start(self, root: Path) -> None: ...

    def submit(self, job: Job, after: str | None = None) -> None: ...

    def wait(self, timeout: float) -> list[Outcome]: ...

    def close(self, *, cancel: bool) -> None: ...


def make_executor(
    executor: str | Executor,
    spec: SweepSpec,
    *,
    address: str | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float | None = None,
) -> Executor:
    """The executor named ``executor`` (``"local"`` or ``"ray"``) for ``spec``, its options checked; an
    ``Executor`` object is returned as it is."""
    if not isinstance(executor, str):
        return executor
    if executor == "local":
        given = [
            n
            for n, v in (("--address", address), ("--cpus-per-run", cpus_per_run), ("--gpus-per-run", gpus_per_run))
            if v is not None
        ]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --executor ray")
        workers = spec.workers or default_workers(spec)
        return LocalPool(workers, threads=1 if spec.device == "cpu" and workers > 1 else 0)
    if executor == "ray":
        return RayExecutor(spec, address=address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run)
    raise ConfigError(f"--executor must be local or ray, got {executor!r}")


def _fail_dependants(waiting: dict[str, list[Job]], root: Path, failed: Outcome) -> list[Outcome]:
    """The outcomes of every job waiting (directly or not) on the failed job."""
    out: list[Outcome] = []
    for job in waiting.pop(failed.id, []):
        outcome = execute_job(root, job, teacher=failed)  # returns at once: the teacher failed
        out.append(outcome)
        out.extend(_fail_dependants(waiting, root, outcome))
    return out


# ------------------------------------------------------------------------------------- local pool
def _watch_parent(parent: int) -> None:
    """Exit when the parent is gone (killed with SIGKILL): a worker is never left behind."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def _worker_main(conn: multiprocessing.connection.Connection, root: str, threads: int, parent: int) -> None:
    """A pool worker: run the jobs it receives, one at a time, until told to stop or orphaned."""
    # Ctrl-C reaches the whole process group: the parent decides what happens to the runs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        conn.send(execute_job(root, job, threads))


class _Worker:
    def __init__(self, ctx: Any, root: Path, threads: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, str(root), threads, os.getpid()), daemon=True)
        self.proc.start()
        child.close()
        self.job: Job | None = None


def _exit_text(code: int | None) -> str:
    if code is None:
        return "it did not report"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class LocalPool:
    """``workers`` worker processes on this machine (fresh interpreters: no OpenMP or CUDA state inherited
    through fork), each running one job at a time with ``threads`` torch threads (0: torch's default).

    A worker that dies (killed, out of memory) fails only its own run: a new worker takes the next one.
    ``close(cancel=True)`` sends SIGTERM to every worker and SIGKILL to those still there after a few
    seconds; a worker whose parent dies exits by itself."""

    def __init__(self, workers: int, threads: int = 0) -> None:
        self.workers = workers
        self.threads = threads
        self.root: Path | None = None
        self.pool: list[_Worker] = []
        self.ready: collections.deque[Job] = collections.deque()
        self.waiting: dict[str, list[Job]] = {}
        self.outcomes: dict[str, Outcome] = {}
        self.news: list[Outcome] = []

    def describe(self) -> str:
        return f"{self.workers} local worker process(es)"

    def start(self, root: Path) -> None:
        self.root = Path(root)
        self.ctx = multiprocessing.get_context("spawn")

    def submit(self, job: Job, after: str | None = None) -> None:
        assert self.root is not None, "start() first"
        if after is None or (after in self.outcomes and self.outcomes[after].ok):
            self.ready.append(job)
        elif after in self.outcomes:  # its teacher already failed
            self._record(execute_job(self.root, job, teacher=self.outcomes[after]))
        else:
            self.waiting.setdefault(after, []).append(job)
        self._dispatch()

    def _record(self, outcome: Outcome) -> None:
        self.outcomes[outcome.id] = outcome
        self.news.append(outcome)
        if outcome.ok:
            self.ready.extend(self.waiting.pop(outcome.id, []))
        else:
            for o in _fail_dependants(self.waiting, self.root, outcome):
                self.outcomes[o.id] = o
                self.news.append(o)

    def _dispatch(self) -> None:
        while self.ready:
            idle = [w for w in self.pool if w.job is None]
            if not idle and len(self.pool) >= self.workers:
                return
            worker = idle[0] if idle else _Worker(self.ctx, self.root, self.threads)
            if not idle:
                self.pool.append(worker)
            job = self.ready.popleft()
            try:
                worker.conn.send(job)
            except (BrokenPipeError, OSError):  # died while idle: replace it and retry the job
                self._discard(worker)
                self.ready.appendleft(job)
                continue
            worker.job = job

    def _discard(self, worker: _Worker) -> None:
        self.pool.remove(worker)
        worker.proc.join(1.0)
        if worker.proc.is_alive():
            worker.proc.kill()
            worker.proc.join()
        worker.conn.close()

    def wait(self, timeout: float) -> list[Outcome]:
        busy = [w for w in self.pool if w.job is not None]
        if busy and not self.news:
            handles = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
            multiprocessing.connection.wait(handles, timeout)
            for worker in busy:
                outcome = None
                if worker.conn.poll():
                    try:
                        outcome = worker.conn.recv()
                    except (EOFError, OSError):
                        outcome = None
                    else:
                        job, worker.job = worker.job, None
                        self._record(outcome)
                        continue
                if worker.proc.is_alive():
                    continue
                job = worker.job
                self._discard(worker)  # a new worker takes the next job
                self._record(
                    Outcome(job.id, ok=False, error=f"its worker process died ({_exit_text(worker.proc.exitcode)})")
                )
            self._dispatch()
        elif not self.news:
            time.sleep(min(timeout, 0.1))  # nothing running (the caller is about to learn why)
        news, self.news = self.news, []
        return news

    def close(self, *, cancel: bool) -> None:
        for worker in self.pool:
            if cancel:
                worker.proc.terminate()
            else:
                try:
                    worker.conn.send(None)
                except (BrokenPipeError, OSError):
                    worker.proc.terminate()
        deadline = time.monotonic() + _STOP_SECONDS
        for worker in self.pool:
            worker.proc.join(max(0.0, deadline - time.monotonic()))
            if worker.proc.is_alive():
                worker.proc.kill()
                worker.proc.join()
            worker.conn.close()
        self.pool = []


class InProcess:
    """Every job in this process, one after the other in submission order (a teacher before its students),
    with ``threads`` torch threads (0: as they are; restored on ``close``). No start-up cost: for grids of
    tiny runs such as the demo's. Ctrl-C stops the run in progress as a kill would."""

    def __init__(self, threads: int = 0) -> None:
        self.threads = threads
        self.root: Path | None = None
        self.queue: collections.deque[tuple[Job, str | None]] = collections.deque()
        self.outcomes: dict[str, Outcome] = {}

    def describe(self) -> str:
        return "this process"

    def start(self, root: Path) -> None:
        import torch

        self.root = Path(root)
        self.saved_threads = torch.get_num_threads()

    def submit(self, job: Job, after: str | None = None) -> None:
        assert self.root is not None, "start() first"
        self.queue.append((job, after))

    def wait(self, timeout: float) -> list[Outcome]:
        if not self.queue:
            return []
        job, after = self.queue.popleft()
        outcome = execute_job(self.root, job, self.threads, self.outcomes.get(after) if after else None)
        self.outcomes[job.id] = outcome
        return [outcome]

    def close(self, *, cancel: bool) -> None:
        import torch

        self.queue.clear()
        if self.root is not None:
            torch.set_num_threads(self.saved_threads)


# -------------------------------------------------------------------------------------------- Ray
def _ray_task(root: str, job: Job, threads: int, teacher: Outcome | None) -> Outcome:
    """One run as a Ray task; ``teacher`` is the outcome of the teacher's task (Ray passes it when done)."""
    return execute_job(root, job, threads, teacher)


class RayExecutor:
    """Each run a Ray task asking for ``cpus_per_run`` CPUs (default 1) and ``gpus_per_run`` GPUs (default 1
    with ``--device cuda``, else 0); a student's task takes its teacher's task's result as an argument, so
    Ray starts it when the teacher is done. Connects to the cluster at ``address`` (or ``RAY_ADDRESS``, or
    a Ray already initialised in this process), else starts a local one with ``spec.workers`` CPUs (default:
    all). The sweep directory must be visible at the same path on every node. A task is not retried: a run
    whose worker dies fails (and resumes from its checkpoint when the sweep is run again)."""

    def __init__(
        self,
        spec: SweepSpec,
        *,
        address: str | None = None,
        cpus_per_run: float | None = None,
        gpus_per_run: float | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(
                "--executor ray needs Ray, which is not installed: pip install 'rkd-engine[ray]' (or pip install ray)"
            ) from None
        self.ray = ray
        self.cpus = 1.0 if cpus_per_run is None else _number("--cpus-per-run", cpus_per_run, positive=True)
        default_gpus = 1.0 if spec.device == "cuda" else 0.0
        self.gpus = default_gpus if gpus_per_run is None else _number("--gpus-per-run", gpus_per_run)
        if spec.device == "cuda" and self.gpus <= 0:
            raise ConfigError(
                "--device cuda needs --gpus-per-run > 0 (Ray hides the GPUs from a task that asks for none)"
            )
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.local_cpus = spec.workers
        self.threads = max(1, int(self.cpus)) if spec.device == "cpu" else 0
        self.owns = False
        self.refs: dict[str, Any] = {}
        self.jobs: dict[Any, Job] = {}
        self.failed: set[str] = set()

    def describe(self) -> str:
        where = self.address or ("the Ray of this process" if self.ray.is_initialized() else "a local Ray")
        return f"{where}, {self.cpus:g} CPU(s) and {self.gpus:g} GPU(s) per run"

    def start(self, root: Path) -> None:
        ray = self.ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "warning", "log_to_driver": False}
            if self.address is None:
                kwargs["num_cpus"] = self.local_cpus or os.cpu_count() or 1
            ray.init(address=self.address, **kwargs)
            self.owns = True
        self.task = ray.remote(_ray_task).options(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0, retry_exceptions=False
        )
        self.root = str(root)

    def submit(self, job: Job, after: str | None = None) -> None:
        ref = self.task.remote(self.root, job, self.threads, self.refs.get(after) if after else None)
        self.refs[job.id] = ref
        self.jobs[ref] = job

    def wait(self, timeout: float) -> list[Outcome]:
        if not self.jobs:
            return []
        ray = self.ray
        ready, rest = ray.wait(list(self.jobs), num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        out = []
        for ref in ready:
            job = self.jobs.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as exc:  # the task died (worker killed, node lost) or was cancelled
                if job.after in self.failed:
                    outcome = Outcome(job.id, ok=False, error=f"not run: its teacher {job.after} failed")
                else:
                    text = str(exc).strip().splitlines()
                    outcome = Outcome(job.id, ok=False, error=f"Ray: {type(exc).__name__}: {text[0] if text else ''}")
            if not outcome.ok:
                self.failed.add(job.id)
            out.append(outcome)
        return out

    def close(self, *, cancel: bool) -> None:
        ray = self.ray
        if cancel:
            for ref in list(self.jobs):
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # already finished or gone
                    pass
            self.jobs.clear()
        if self.owns and ray.is_initialized():
            ray.shutdown()
            self.owns = False


def _number(flag: str, value: Any, *, positive: bool = False) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = float("nan")
    if not (out > 0 if positive else out >= 0) or out == float("inf"):
        raise ConfigError(f"{flag} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
    return out
