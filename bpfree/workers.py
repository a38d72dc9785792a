"""Where a sweep's attempts run: one attempt of one unit in a worker process, and the pools
that start them (local processes, or Ray tasks).

An attempt is `execute`: it takes the unit's lock, trains through the harness's `run_unit`,
which writes the unit's folder itself, and returns only a small outcome. Every attempt runs in
a process of its own so that a crash, an OOM kill or a `kill -9` loses that attempt and
nothing else; the driver (`bpfree/sweep.py`) records it and decides on a retry. Local workers
die with their driver (`_die_with_driver`), so a killed driver leaves no process training on.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from bpfree.data import Dataset, load_dataset
from bpfree.harness import Budget, run_unit
from bpfree.methods import ConfigError
from bpfree.provenance import device_name
from bpfree.records import LOCK_NAME, RecordsError, exclusive, write_json

if TYPE_CHECKING:
    from bpfree.sweep import SweepUnit


# --- one attempt of one unit, in a worker process --------------------------------------------


@dataclass(frozen=True)
class Context:
    """What every unit of a sweep shares: the budget except epochs, and where things are."""

    sweep_dir: str  # absolute: workers may run elsewhere
    batch_size: int
    device: str  # cpu or cuda, resolved by the driver
    data_dir: str | None
    val_fraction: float
    target_acc: float | None
    threads: int  # torch intra-op threads per unit (= CPUs a unit is given)
    executor: str
    inference_runs: int = 1
    keep_model: bool = False
    # Share of one GPU each unit asks Ray for (1/units_per_gpu; 0 on CPU), and the Ray
    # resource it is taken from: "GPU", or a custom resource standing in for one in tests.
    gpu_fraction: float = 0.0
    gpu_resource: str = "GPU"


@lru_cache(maxsize=2)
def _dataset(name: str, data_dir: str | None, val_fraction: float) -> Dataset:
    """A worker loads each dataset once and reuses it for the units that follow."""
    return load_dataset(name, data_dir, False, val_fraction)


def execute(unit: SweepUnit, ctx: Context, attempt: int) -> dict[str, Any]:
    """Run one attempt of a unit; the Ray task and the local child process both call this.

    It first takes the unit's lock, waiting if another process holds it (the worker of a
    driver that died and has not stopped yet, or a `bpfree run` into this folder): the
    harness then finds the unit as that process left it, and never trains it twice.

    Exceptions are returned, not raised, so the driver tells user mistakes and unusable
    records (not retried: they would fail again) from other errors. A dead process returns
    nothing; the driver sees that.
    """
    torch.set_num_threads(ctx.threads)
    unit_dir = Path(ctx.sweep_dir) / "units" / unit.id
    try:
        waited = time.monotonic()
        with exclusive(unit_dir / LOCK_NAME):
            waited = time.monotonic() - waited
            write_json(unit_dir / "worker.json", {
                "attempt": attempt, "executor": ctx.executor, "host": socket.gethostname(),
                "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                "device_name": device_name("cuda" if ctx.device == "cuda" else "cpu"),
                "started": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "lock_wait_s": round(waited, 3),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "gpu_share": _gpu_share(ctx),
            })
            data = _dataset(unit.dataset, ctx.data_dir, ctx.val_fraction)
            budget = Budget(epochs=unit.epochs, batch_size=ctx.batch_size, device=ctx.device,
                            target_accuracy=ctx.target_acc, inference_runs=ctx.inference_runs,
                            keep_model=ctx.keep_model)
            result = run_unit(unit, data, budget, unit_dir, lock=False)
        finished = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        return {"status": result.summary["status"], "error": None, "retry": False,
                "finished": finished}
    except Exception as exc:  # recorded by the driver; the worker stays usable
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                "retry": not isinstance(exc, (ConfigError, RecordsError)),
                "traceback": traceback.format_exc()}


def _gpu_share(ctx: Context) -> float | None:
    """The share of a GPU (or of the stand-in resource) Ray gave this task; None elsewhere."""
    if ctx.executor != "ray" or not ctx.gpu_fraction:
        return None
    import ray

    return ray.get_runtime_context().get_assigned_resources().get(ctx.gpu_resource)


def died(exitcode: int | None) -> dict[str, Any]:
    """The outcome of an attempt whose process ended without a result."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory, or killed)" if name == "SIGKILL" else ""
        error = f"WorkerDied: worker process killed by {name}{hint}"
    else:
        error = f"WorkerDied: worker process exited with code {exitcode} before finishing"
    return {"status": "failed", "error": error, "retry": True}


# --- pools: where attempts run -------------------------------------------------------------


class Pool(Protocol):
    capacity: int

    def submit(self, unit: SweepUnit, attempt: int) -> None: ...

    def wait(self, timeout: float) -> list[tuple[SweepUnit, int, dict[str, Any]]]: ...

    def close(self) -> None: ...


def _die_with_driver(alive: Any) -> None:
    """End this worker as soon as its driver ends, however it ends (a SIGKILL included).

    `alive` is the read end of a pipe whose only write end the driver holds: the kernel
    closes it when the driver dies, and a thread here reads EOF and kills this process. A
    local worker's parent is the forkserver, not the driver, and the forkserver stays up
    while any of its children lives, so neither the parent's death (prctl PR_SET_PDEATHSIG)
    nor adoption by init would ever come: without this the worker would train on, unseen,
    writing into a folder that a restarted sweep is using.
    """

    def watch() -> None:
        try:
            while True:
                alive.recv()  # the driver never sends: this returns only at EOF
        except (EOFError, OSError):
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="bpfree-driver-watch", daemon=True).start()


def _local_worker(conn: Any, alive: Any, ctx: Context, gpu: int | None) -> None:
    """A local worker's life: attempts from the driver, one at a time, until it hangs up."""
    _die_with_driver(alive)
    if gpu is not None:  # before anything touches CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    while True:
        try:
            unit, attempt = conn.recv()
        except (EOFError, OSError):  # the driver hung up, or died (ECONNRESET)
            return
        try:
            conn.send(execute(unit, ctx, attempt))
        except OSError:  # it died while this attempt ran: nobody to tell
            return


@dataclass
class _Slot:
    proc: Any = None  # the worker process, None until started or after it died
    conn: Any = None  # the driver's end of its pipe
    job: tuple[SweepUnit, int] | None = None  # the (unit, attempt) it runs now


class LocalPool:
    """`capacity` worker processes on this machine, each running one attempt at a time.

    Workers fork from a forkserver that has imported torch once, and live across attempts, so
    a dataset loaded for one unit serves the next (as on Ray). A worker that dies is replaced
    at the next submit: a crash or a kill costs one attempt, never the pool. Workers end when
    the driver does (`_die_with_driver`): `self.alive` is the one write end of their pipe.
    """

    def __init__(self, ctx: Context, capacity: int) -> None:
        self.ctx, self.capacity = ctx, capacity
        self.mp = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods()
                                 else "spawn")
        if self.mp.get_start_method() == "forkserver":
            self.mp.set_forkserver_preload(["bpfree.sweep", "bpfree.workers"])
        self.gpus = torch.cuda.device_count() if ctx.device == "cuda" else 0
        self.slots = [_Slot() for _ in range(capacity)]
        self.watched, self.alive = self.mp.Pipe(duplex=False)  # (read end, write end)

    def _start(self, i: int) -> _Slot:
        ours, theirs = self.mp.Pipe()
        gpu = i % self.gpus if self.gpus else None  # one GPU per worker, round robin
        proc = self.mp.Process(target=_local_worker, args=(theirs, self.watched, self.ctx, gpu),
                               name=f"bpfree-worker-{i}", daemon=True)
        proc.start()
        theirs.close()
        self.slots[i] = _Slot(proc, ours)
        return self.slots[i]

    def submit(self, unit: SweepUnit, attempt: int) -> None:
        i = next(i for i, slot in enumerate(self.slots) if slot.job is None)
        slot = self.slots[i]
        if slot.proc is None or not slot.proc.is_alive():
            slot = self._start(i)
        try:
            slot.conn.send((unit, attempt))
        except OSError:  # it died while idle
            slot = self._start(i)
            slot.conn.send((unit, attempt))
        slot.job = (unit, attempt)

    def wait(self, timeout: float) -> list[tuple[SweepUnit, int, dict[str, Any]]]:
        busy = [(i, slot) for i, slot in enumerate(self.slots) if slot.job is not None]
        ready = set(mp.connection.wait(
            [h for _, slot in busy for h in (slot.proc.sentinel, slot.conn)], timeout))
        done = []
        for i, slot in busy:
            if slot.proc.sentinel not in ready and slot.conn not in ready:
                continue
            try:
                outcome = slot.conn.recv() if slot.conn.poll() else None
            except (EOFError, OSError):  # the worker died before sending a result
                outcome = None
            if outcome is None:
                slot.proc.join()
                outcome = died(slot.proc.exitcode)
                slot.conn.close()
                self.slots[i] = _Slot()
            done.append((*slot.job, outcome))
            slot.job = None
        return done

    def close(self) -> None:
        for slot in self.slots:
            if slot.proc is None:
                continue
            if slot.job is not None:
                slot.proc.kill()
            slot.conn.close()  # an idle worker reads EOF and returns
            slot.proc.join(timeout=10)
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join()
        self.slots = [_Slot() for _ in range(self.capacity)]


class RayPool:
    """Each attempt is a Ray task asking for the CPUs (and GPU) a unit needs.

    Ray's own retries are off: every failure comes back here to be recorded, then retried.
    """

    def __init__(self, ctx: Context, capacity: int) -> None:
        import ray

        self.ray = ray
        self.capacity = capacity
        share = ({"num_gpus": ctx.gpu_fraction} if ctx.gpu_resource == "GPU"
                 else {"resources": {ctx.gpu_resource: ctx.gpu_fraction}})
        self.task = ray.remote(execute).options(
            num_cpus=ctx.threads, max_retries=0, retry_exceptions=False,
            **(share if ctx.gpu_fraction else {}))
        self.ctx = ctx
        self.running: dict[Any, tuple[SweepUnit, int]] = {}  # object ref -> unit, attempt

    def submit(self, unit: SweepUnit, attempt: int) -> None:
        self.running[self.task.remote(unit, self.ctx, attempt)] = (unit, attempt)

    def wait(self, timeout: float) -> list[tuple[SweepUnit, int, dict[str, Any]]]:
        if not self.running:
            return []
        ready, _ = self.ray.wait(list(self.running), num_returns=len(self.running),
                                 timeout=timeout)
        done = []
        for ref in ready:
            unit, attempt = self.running.pop(ref)
            try:
                outcome = self.ray.get(ref)
            except self.ray.exceptions.RayError as exc:  # worker crashed, OOM-killed, node lost
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                outcome = {"status": "failed", "error": f"{type(exc).__name__}: {first}",
                           "retry": True}
            done.append((unit, attempt, outcome))
        return done

    def close(self) -> None:
        for ref in self.running:
            self.ray.cancel(ref, force=True)
        self.running.clear()


def start_ray(address: str | None) -> bool:
    """Join the cluster at `address` (`auto`: the one `ray start` made here), or start a
    private local one. Returns whether we started Ray (and so must shut it down).

    Usage statistics and the dashboard are off: nothing may reach the network. A private
    cluster talks over 127.0.0.1 only (Ray's single-machine mode, read when ray is imported).
    """
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'ray[tune]' "
                          "(or the bpfree[ray] extra)") from None
    if ray.is_initialized():
        return False
    # address="local" always starts a new cluster; a bare ray.init() would silently join any
    # cluster someone else started on this machine.
    try:
        ray.init(address=address or "local", include_dashboard=False if not address else None,
                 log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if not address:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot join the Ray cluster at {address!r} ({first}); check the "
                          f"address, and for a cluster with token authentication set "
                          f"RAY_AUTH_MODE=token and its token") from None
    return True
