"""Worker processes for tensor parallelism: ranks 1..N-1, with the calling process as rank 0.

Like vLLM: fork when the parent has not initialized CUDA (cheap, and no
``__main__`` guard needed), otherwise spawn, with a warning, since a forked child
cannot use CUDA after its parent did. Every rank joins one default process group
(NCCL on GPU, gloo on CPU) plus a gloo "host group" for start-up barriers, and rank 0
has a pipe to each worker for its per-step messages and the workers' replies. A worker's
exception reaches the parent with its rank and traceback: rank 0 polls the rendezvous
while it waits for workers to join, and after that a dead peer fails the next host-group
collective at once. Workers ignore SIGINT: a Ctrl-C in a terminal reaches the whole
process group, and only rank 0 decides what an interrupt stops. The group shuts down on
``shutdown()``, when its owner is collected, and at interpreter exit, and never leaves
processes behind.
"""

from __future__ import annotations

import datetime
import gc
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import tempfile
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

START_METHODS = ("fork", "spawn")
# How long a collective may wait for a peer: a dead peer closes its connection sooner.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
JOIN_SECONDS = 10.0  # a worker asked to stop gets this long before it is terminated
# Rank 0 checks for dead workers this often while it waits for them to join.
JOIN_POLL = datetime.timedelta(seconds=1)
# How often a worker waiting for rank 0's next message checks that its parent still lives,
# and rank 0 waiting for a worker's reply checks that the worker does.
PARENT_CHECK_SECONDS = 1.0


class WorkerGone(RuntimeError):
    """A worker's pipe closed while rank 0 waited for its reply."""


@dataclass
class WorkerLinks:
    """What connects a rank to the others besides the default process group."""

    host_group: dist.ProcessGroup  # gloo, every rank: start-up barriers, host collectives
    # Rank 0 <-> each worker: rank 0 holds one end per worker, a worker the other. Rank 0
    # sends one message a step; a worker answers only remote calls. A pipe wakes a waiting
    # reader in microseconds, where a gloo broadcast costs a TCP round trip per call.
    pipes: list[Connection]

    def send(self, message: bytes) -> None:
        """Rank 0: ``message`` to every worker."""
        for pipe in self.pipes:
            pipe.send_bytes(message)

    def receive(self) -> bytes | None:
        """A worker: rank 0's next message; None once rank 0's process is gone."""
        (pipe,) = self.pipes
        parent = os.getppid()
        while not pipe.poll(PARENT_CHECK_SECONDS):
            if os.getppid() != parent:
                return None
        try:
            return pipe.recv_bytes()
        except EOFError:
            return None

    def reply(self, value: Any) -> None:
        """A worker: answer rank 0's last remote call."""
        (pipe,) = self.pipes
        pipe.send_bytes(pickle.dumps(value))

    def gather_replies(self) -> list[Any]:
        """Rank 0: one reply from each worker, in rank order."""
        replies = []
        for rank, pipe in enumerate(self.pipes, start=1):
            try:
                replies.append(pickle.loads(pipe.recv_bytes()))
            except (EOFError, OSError) as error:
                raise WorkerGone(f"tensor-parallel worker rank {rank} closed its pipe") from error
        return replies


WorkerMain = Callable[[int, int, WorkerLinks, Any], None]  # (rank, world_size, links, payload)


def choose_start_method(requested: str | None) -> str:
    """``requested`` (FXLLM_WORKER_MULTIPROC_METHOD) if set, else fork unless CUDA is initialized."""
    if requested is not None:
        if requested not in START_METHODS:
            raise ValueError(f"FXLLM_WORKER_MULTIPROC_METHOD must be one of {', '.join(START_METHODS)}, got {requested!r}")
        return requested
    if torch.cuda.is_initialized():
        logger.warning(
            "CUDA was initialized before the tensor-parallel workers started, so they are spawned instead of "
            "forked: the script that creates the LLM must guard its entry point with "
            "`if __name__ == \"__main__\":`"
        )
        return "spawn"
    return "fork"


def _joined_key(rank: int) -> str:
    return f"fxllm/joined/{rank}"


def init_process_group(store: dist.Store, rank: int, world_size: int, device_type: str) -> dist.ProcessGroup:
    """Join the default group (NCCL on GPU, gloo on CPU); returns the gloo host group."""
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    # Every rank creates it right after joining, before any work that could fail.
    return dist.new_group(backend="gloo")


def _forget_inherited_state() -> None:
    """A forked child inherits the parent's objects but not their threads.

    - Garbage: destroying an object whose threads stayed behind can wait forever, as a
      stopped engine's process group left in a reference cycle did in the child's first
      garbage collection. Inherited objects are frozen: the child never collects them.
    - OpenMP (torch's intra-op pool): the first parallel CPU op hangs once the parent has
      run one, e.g. the dtype conversion of a checkpoint tensor at load. One thread never
      enters the pool; like DataLoader workers, a rank uses one (GPU ranks do little CPU
      work, CPU ranks share the host's cores).
    - Inductor's compile thread pool would take work no thread ever runs (Inductor's own
      fork hook resets only its process pool).
    """
    gc.freeze()
    torch.set_num_threads(1)
    from torch._inductor.async_compile import AsyncCompile

    pool = getattr(AsyncCompile, "pool", None)
    if pool is not None and hasattr(pool, "cache_clear"):
        pool.cache_clear()


def _worker_entry(
    rank: int, world_size: int, rendezvous: str, device_type: str, main: WorkerMain, payload: Any, errors,
    pipe: Connection,
) -> None:
    try:
        # A terminal's Ctrl-C reaches every process of its group: rank 0 alone handles it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _forget_inherited_state()
        store = dist.FileStore(rendezvous, world_size)
        store.set(_joined_key(rank), "1")
        host_group = init_process_group(store, rank, world_size, device_type)
        main(rank, world_size, WorkerLinks(host_group, [pipe]), payload)
    except BaseException:  # reported to the parent, whatever it was
        trace = traceback.format_exc()
        # Logged here too: the parent reads the queue only once its own rank stops.
        logger.error("tensor-parallel worker rank %d failed:\n%s", rank, trace)
        errors.put((rank, trace))
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerGroup:
    """Starts ranks 1..world_size-1 running ``main(rank, world_size, links, payload)`` and joins
    the caller to the process group as rank 0 (its links: ``self.links``)."""

    def __init__(
        self, world_size: int, device_type: str, main: WorkerMain, payload: Any, start_method: str | None = None
    ):
        method = choose_start_method(start_method)
        context = multiprocessing.get_context(method)
        self._scratch = tempfile.TemporaryDirectory(prefix="fxllm-tp-")
        rendezvous = str(Path(self._scratch.name) / "rendezvous")
        self._errors = context.Queue()
        self._processes = []
        self._pipes: list[Connection] = []
        try:
            for rank in range(1, world_size):
                worker_end, own_end = context.Pipe(duplex=True)
                process = context.Process(
                    target=_worker_entry,
                    args=(rank, world_size, rendezvous, device_type, main, payload, self._errors, worker_end),
                    name=f"fxllm-tp-rank{rank}",
                    daemon=True,  # never outlive the parent
                )
                process.start()
                # Only the worker holds its end: once the worker is gone, a send fails at once
                # (and workers forked later do not inherit it).
                worker_end.close()
                self._processes.append(process)
                self._pipes.append(own_end)
        except RuntimeError as error:
            _stop(self._processes)
            if method == "spawn" and "bootstrapping phase" in str(error):
                raise RuntimeError(
                    "tensor_parallel_size > 1 spawns worker processes, which re-import your script: guard the "
                    "code that creates the LLM with `if __name__ == \"__main__\":` (or create the LLM before "
                    "anything initializes CUDA, so workers are forked)"
                ) from error
            raise
        self._finalizer = weakref.finalize(self, _stop, self._processes)
        if device_type == "cpu":
            torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
        try:
            store = dist.FileStore(rendezvous, world_size)
            self._wait_for_workers(store, world_size)
            self.links = WorkerLinks(init_process_group(store, 0, world_size, device_type), self._pipes)
        except BaseException:
            self._finalizer()
            self._scratch.cleanup()
            raise

    def _wait_for_workers(self, store: dist.Store, world_size: int) -> None:
        """Until every worker is about to join; a worker that died first raises its error here
        instead of leaving rank 0 in the rendezvous until COLLECTIVE_TIMEOUT."""
        keys = [_joined_key(rank) for rank in range(1, world_size)]
        deadline = datetime.datetime.now() + COLLECTIVE_TIMEOUT
        while True:
            try:
                store.wait(keys, JOIN_POLL)
                return
            except RuntimeError as timeout:  # DistStoreError: not every key yet
                self.raise_worker_error()
                if datetime.datetime.now() > deadline:
                    raise RuntimeError(f"tensor-parallel workers did not start within {COLLECTIVE_TIMEOUT}") from timeout

    def raise_worker_error(self, cause: BaseException | None = None) -> None:
        """Raise the first worker's error (with its rank), if a worker failed."""
        for process in self._processes:
            process.join(timeout=0)  # reap finished workers so their exit codes are known
        try:
            rank, trace = self._errors.get(timeout=1.0 if cause is not None else 0.01)
        except queue.Empty:
            dead = [p.name for p in self._processes if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"tensor-parallel worker(s) {', '.join(dead)} died without a report") from cause
            return
        raise RuntimeError(f"tensor-parallel worker rank {rank} failed:\n{trace}") from cause

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self._finalizer()
        for pipe in self._pipes:
            pipe.close()
        self._scratch.cleanup()

    @property
    def exit_codes(self) -> list[int | None]:
        """Each worker's exit code; None while it runs."""
        for process in self._processes:
            process.join(timeout=0)
        return [process.exitcode for process in self._processes]

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]


def _stop(processes: list) -> None:
    for process in processes:
        process.join(timeout=JOIN_SECONDS if process.is_alive() else 0)
        if process.is_alive():
            process.terminate()
            process.join(timeout=JOIN_SECONDS)
        if process.is_alive():
            os.kill(process.pid, 9)
