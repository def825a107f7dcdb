"""Where per-layer fits run. An executor maps a job function over argument tuples and yields
results as they finish (any order); the pass only needs `map`.

`LocalExecutor` runs jobs in-process, several at once on the available cores. `RayExecutor` runs
each job as a Ray task on an existing cluster (or a local one it starts), for models that outgrow
one machine. Every job runs torch with the same number of intra-op threads (`Config.threads`,
default 1) in both, and numpy's BLAS with as many, so the same settings and seed give the same model
whichever executor runs it.

Both accept `on_error(args, exc) -> result`: a job that raises (after Ray's retries) is turned
into a result by it, so one bad layer does not sink the run. Without it the error propagates.
"""
from __future__ import annotations

import copy
import logging
import os
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Protocol

from riem_compiler.errors import InputError

log = logging.getLogger("riem_compiler.executors")

OnError = Callable[[tuple, BaseException], Any]

RAY_MISSING = ("executor='ray' needs Ray, which is an optional extra: "
               "pip install 'riem-compiler[ray]' (or pip install ray)")


class Executor(Protocol):
    def map(self, fn: Callable, jobs: Iterable[tuple], on_error: OnError | None = None) -> Iterator: ...


def _set_torch_threads(n: int | None) -> int | None:
    """Set torch's intra-op threads; returns the previous count (None when n is None)."""
    if n is None:
        return None
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    return previous


def _blas_threads(n: int):
    """A context that runs numpy's BLAS (OpenBLAS, MKL) with n threads, as torch runs with n: a
    BLAS result may depend on its thread count, and two jobs side by side with a BLAS thread per
    core each oversubscribe the cores (a 614x614 Cholesky took 136 ms instead of 6 in auto's
    profile here). The limit is process-wide, so every job of a run uses the same n."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=max(1, int(n)), user_api="blas")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity set where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class LocalExecutor:
    """In-process; up to `workers` jobs at once, each in its own thread (numpy and torch release
    the GIL in their kernels, so independent layer fits use the cores side by side).

    num_threads: torch intra-op threads of every job (None: 1). Results depend on it, never on
    `workers` or on the order jobs finish, and are bit for bit those of a RayExecutor whose tasks
    use as many threads. workers: jobs at once (None: the available cores // num_threads).
    The calling thread's torch thread count is restored afterwards.
    """

    def __init__(self, num_threads: int | None = None, workers: int | None = None):
        self.num_threads = max(1, int(num_threads or 1))
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InputError(f"workers must be a positive integer or None; got {workers!r}")
        self.workers = workers or max(1, available_cores() // self.num_threads)

    def _run(self, fn: Callable, args: tuple, on_error: OnError | None):
        _set_torch_threads(self.num_threads)  # per thread: torch's OpenMP count is thread-local
        if on_error is None:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as exc:  # one failed layer must not sink the run
            return on_error(args, exc)

    def map(self, fn: Callable, jobs: Iterable[tuple], on_error: OnError | None = None) -> Iterator:
        jobs = list(jobs)
        previous = _set_torch_threads(self.num_threads)
        blas = _blas_threads(self.num_threads)
        try:
            if self.workers == 1 or len(jobs) <= 1:
                for args in jobs:
                    yield self._run(fn, args, on_error)
                return
            yield from self._side_by_side(fn, jobs, on_error)
        finally:
            blas.restore_original_limits()
            _set_torch_threads(previous)

    def _side_by_side(self, fn: Callable, jobs: list[tuple], on_error: OnError | None) -> Iterator:
        """Jobs on daemon threads, results yielded as they finish. When the caller stops (an
        exception, Ctrl-C) no further job starts, and a job still running is abandoned rather
        than waited for: its thread ends with the process."""
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for args in jobs:
            todo.put(args)
        done: queue.SimpleQueue = queue.SimpleQueue()
        stop = threading.Event()

        def work():
            while not stop.is_set():
                try:
                    args = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((True, self._run(fn, args, on_error)))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                    done.put((False, exc))

        for k in range(min(self.workers, len(jobs))):
            threading.Thread(target=work, name=f"riem-job-{k}", daemon=True).start()
        try:
            for _ in jobs:
                ok, value = done.get()
                if not ok:
                    raise value
                yield value
        finally:
            stop.set()


def _is_plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _run_task(fn: Callable, num_threads: int, *args):
    """Body of every Ray task: pin torch's thread count (results depend on it), then run.

    Arguments arrive resolved from the object store; numpy arrays in them are read-only views
    of shared memory, which torch warns about although fitting never writes into them.
    """
    import warnings

    _set_torch_threads(num_threads)
    with _blas_threads(num_threads), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*non-writable.*")
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return fn(*args)


class RayExecutor:
    """Each job is a Ray task declaring `num_cpus` / `num_gpus`.

    address: Ray cluster address ("auto", "ray://host:10001", ...); None joins the cluster named by
        RAY_ADDRESS or starts a local one. If Ray is already initialised it is used as is.
    num_cpus: CPUs per task; the task runs torch with that many threads.
    num_gpus: GPUs per task (1 when fitting on "cuda"); Ray makes the assigned GPU "cuda".
    max_retries: extra tries of a task that raised or whose worker died, before `on_error`.
    max_in_flight: tasks submitted at once (default: twice the task slots of the cluster). Each
        job's bulky arguments are put in the object store once when it is submitted (shared ones,
        like the config, once per map) and released when it finishes, so the store holds only
        the weights of running tasks and the driver keeps only small results.
    init_kwargs: extra keyword arguments of `ray.init` (e.g. num_cpus for a local cluster).

    Workers must be able to import riem_compiler (installed on the cluster, or a local cluster
    started from the source checkout).
    """

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
                 max_retries: int = 2, max_in_flight: int | None = None, init_kwargs: dict | None = None):
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise InputError(RAY_MISSING) from exc
        if num_cpus <= 0 and num_gpus <= 0:
            raise InputError(f"a Ray task must ask for some CPU or GPU; got num_cpus={num_cpus}, num_gpus={num_gpus}")
        if max_retries < 0:
            raise InputError(f"max_retries must be >= 0; got {max_retries}")
        self.address = address
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        self.init_kwargs = dict(init_kwargs or {})
        self.started_ray = False

    def _ensure_ray(self):
        import ray

        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, **self.init_kwargs}
            # None: RAY_ADDRESS, else a new local cluster ("local"), never one that a leftover
            # /tmp/ray/ray_current_cluster names (ray.init(None) tries that one, and fails if it is gone)
            address = self.address or os.environ.get("RAY_ADDRESS") or "local"
            log.info("connecting to Ray (address=%s)", address)
            ray.init(address=address, **kwargs)
            self.started_ray = True
        return ray

    def _slots(self, ray) -> int:
        resources = ray.cluster_resources()
        slots = []
        if self.num_cpus > 0:
            slots.append(resources.get("CPU", 0) // self.num_cpus)
        if self.num_gpus > 0:
            slots.append(resources.get("GPU", 0) // self.num_gpus)
        n = int(min(slots)) if slots else 0
        if n < 1:
            raise InputError(f"the Ray cluster ({resources}) cannot run a task that needs "
                             f"num_cpus={self.num_cpus}, num_gpus={self.num_gpus}")
        return n

    def map(self, fn: Callable, jobs: Iterable[tuple], on_error: OnError | None = None) -> Iterator:
        ray = self._ensure_ray()
        task = ray.remote(_run_task).options(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.max_retries,
            retry_exceptions=True)
        threads = max(1, int(self.num_cpus))
        window = self.max_in_flight or 2 * self._slots(ray)
        fn_ref = ray.put(fn)
        jobs = list(jobs)
        uses: dict[int, int] = {}  # id(arg) -> jobs not yet finished that take it
        for args in jobs:
            for value in args:
                if not _is_plain(value):
                    uses[id(value)] = uses.get(id(value), 0) + 1
        stored: dict[int, Any] = {}  # id(arg) -> its object ref, while some job still needs it
        pending: dict[Any, tuple] = {}  # task ref -> job args
        queue = iter(jobs)

        def put(value):
            if _is_plain(value):
                return value
            if id(value) not in stored:
                stored[id(value)] = ray.put(value)
            return stored[id(value)]

        def release(args):
            for value in args:
                if not _is_plain(value):
                    uses[id(value)] -= 1
                    if uses[id(value)] == 0:
                        stored.pop(id(value), None)

        def submit() -> bool:
            args = next(queue, None)
            if args is None:
                return False
            pending[task.remote(fn_ref, threads, *[put(a) for a in args])] = args
            return True

        try:
            while len(pending) < window and submit():
                pass
            while pending:
                [done], _ = ray.wait(list(pending), num_returns=1)
                args = pending.pop(done)
                try:
                    # copy out of the object store: results are then ordinary writable arrays
                    # and the store can drop them at once
                    result = copy.deepcopy(ray.get(done))
                except ray.exceptions.RayError as exc:  # raised every try, worker died, object lost
                    if on_error is None:
                        raise
                    cause = exc.as_instanceof_cause() if isinstance(exc, ray.exceptions.RayTaskError) else exc
                    result = on_error(args, TaskFailed(cause, self.max_retries + 1))
                del done
                release(args)
                submit()
                yield result
        finally:
            for ref in pending:  # interrupted (Ctrl-C, consumer stopped): stop what still runs
                ray.cancel(ref, force=True)
            pending.clear()
            stored.clear()

    def shutdown(self) -> None:
        """Stop the local Ray instance if this executor started it."""
        if self.started_ray:
            import ray

            ray.shutdown()
            self.started_ray = False


class TaskFailed(RuntimeError):
    """A Ray task that failed on every try; its message keeps the worker's error short."""

    def __init__(self, cause: BaseException, tries: int):
        first_line = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        super().__init__(f"failed {tries} time(s) on Ray workers: {first_line}")
        self.cause = cause
        self.tries = tries


def make_executor(config, **options) -> Executor:
    """The executor `config.executor` names. `options` go to its constructor
    (e.g. num_threads for local; num_cpus, max_retries, init_kwargs for ray)."""
    name = getattr(config, "executor", "local")
    threads = getattr(config, "threads", None)
    if name == "local":
        options.setdefault("num_threads", threads)
        options.setdefault("workers", getattr(config, "workers", None))
        return LocalExecutor(**options)
    if name == "ray":
        device = str(getattr(config, "device", "cpu"))
        if device.startswith("cuda:"):
            raise InputError(f"with executor='ray' use device='cuda', not {device!r}: "
                             "Ray gives each task its own GPU")
        options.setdefault("num_gpus", 1 if device == "cuda" else 0)
        if threads is not None:
            options.setdefault("num_cpus", threads)
        return RayExecutor(address=getattr(config, "ray_address", None), **options)
    raise InputError(f"unknown executor {name!r}; use 'local' or 'ray'")
