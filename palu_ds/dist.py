"""Process-group helpers shared by training and evaluation: rank discovery (deepspeed / torchrun / mpirun / srun /
single process), collectives, and the example split of a distributed evaluation (:func:`shard_indices`,
:func:`gather_records`: an N-rank evaluation equals the 1-rank one).

Under ``mpirun`` the ranks come from OpenMPI's ``OMPI_COMM_WORLD_*`` (or MPICH/Intel's ``PMI_*``) variables, under
``srun`` from ``SLURM_PROCID``/``SLURM_NTASKS``; a lone process gets rank 0 of 1. ``MASTER_ADDR``/``MASTER_PORT``
must be exported for multi-node runs (the sbatch scripts do it).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from palu_ds.localrun import SHM_BUFFER, free_port

_SOURCES = [  # (rank, world size, local rank)
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
]


def discover_env() -> None:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* when no launcher set them (mpirun, srun, or one process)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    for r, w, lr in _SOURCES:
        if r in os.environ and w in os.environ:
            os.environ["RANK"], os.environ["WORLD_SIZE"] = os.environ[r], os.environ[w]
            os.environ["LOCAL_RANK"] = os.environ.get(lr, "0")
            if int(os.environ["WORLD_SIZE"]) > 1 and "MASTER_ADDR" not in os.environ:
                raise RuntimeError(f"launched through {r.split('_')[0]} with {os.environ[w]} ranks but MASTER_ADDR is "
                                   "not set: export MASTER_ADDR (first host) and MASTER_PORT")
            break
    else:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if os.environ["WORLD_SIZE"] == "1":
        default_port = free_port()
    elif "SLURM_JOB_ID" in os.environ:  # two jobs sharing a node must not collide
        default_port = 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000
    else:
        default_port = 29500
    os.environ.setdefault("MASTER_PORT", str(default_port))


def env_rank() -> int:
    """This process's rank from the environment of any launcher (before the process group exists)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


def import_dynamo_first() -> None:
    """Import ``torch._dynamo`` before a process group exists (called by :func:`init` and :func:`init_from_env`).

    Imported after ``init_process_group`` -- as the first optimizer or a transformers model does -- it leaves the
    gloo group's threads (``gloo_tcp_loop``, ``pt_gloo_runloop``) running after ``destroy_process_group``; they
    are then torn down at interpreter exit, and about one exit in five aborts (SIGABRT, "terminate called without
    an active exception") after the work is done (torch 2.13; seen on 2 gloo ranks). Imported first, the threads
    end with the group. Costs nothing in a process that loads a model anyway (transformers imports it).
    """
    import torch._dynamo  # noqa: F401


def init(timeout_s: float = 600) -> None:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); ``timeout_s`` bounds every
    collective (``train.timeout``): a collective waiting longer on a peer raises on this rank."""
    import datetime

    import deepspeed

    import_dynamo_first()
    discover_env()
    accel = deepspeed.get_accelerator()
    if accel.device_name() != "cpu":  # bind this rank to its local device before anything lands on device 0
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
        if accel.device_name() == "cpu":
            release_shm_name()


def shm_buffer_path() -> str:
    """The /dev/shm file of DeepSpeed's CPU shared-memory all-reduce for this rank (ops/csrc/cpu/comm/shm.cpp:
    ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``, about 66 MB)."""
    r = dist.get_rank()
    return f"{SHM_BUFFER}{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{r}"


def release_shm_name() -> None:
    """Unlink this rank's shm all-reduce buffer name once every rank has mapped it.

    DeepSpeed creates the buffer (only when LOCAL_SIZE == world size, i.e. under its launcher on one host) and
    never unlinks it, so each job left 66 MB per rank in /dev/shm until the machine filled up
    (deepspeedai/DeepSpeed#4115). Every rank opens its peers' buffers inside ``init_distributed``; after a barrier
    the names are no longer needed and the mappings stay valid, so the memory goes back when the job ends, crash
    or not.
    """
    if world() < 2:
        return
    dist.barrier()
    try:
        os.unlink(shm_buffer_path())
    except FileNotFoundError:
        pass


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if dist.is_initialized() and world() > 1:
        dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def broadcast_object(obj):
    if dist.is_initialized() and world() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized() and world() > 1:
        dist.barrier()


class StepWatchdog:
    """A bound on one training step, whatever it waits on: if ``arm()`` is not followed by ``disarm()`` within
    ``timeout_s`` seconds (a peer stopped or hung outside any collective that has a timeout), the stacks of every
    thread are written to stderr and the process exits with status 124, so the launcher ends the job (a SIGSTOPped
    or wedged peer does not end it). The collectives' own bound is the process-group timeout given to
    :func:`init`; the watchdog catches what that does not cover (a stuck kernel, a lost shared-memory peer)."""

    EXIT_STATUS = 124

    def __init__(self, timeout_s: float, setting: str = "train.timeout",
                 then: str = "resume from the last complete checkpoint"):
        import threading

        self.timeout_s, self._deadline, self._what = float(timeout_s), None, ""
        self.setting, self.then = setting, then  # named in the message: the bound's setting, what to do next
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="palu-step-watchdog", daemon=True)
        self._thread.start()

    def arm(self, what: str) -> None:
        import time

        self._what, self._deadline = what, time.monotonic() + self.timeout_s

    def disarm(self) -> None:
        self._deadline = None

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        import faulthandler
        import logging
        import sys
        import time

        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                logging.getLogger("palu_ds").error(
                    "%s did not finish within %s=%g s (a peer stopped or hung?): exiting with status %d so the job "
                    "ends; %s", self._what, self.setting, self.timeout_s, self.EXIT_STATUS, self.then)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                from palu_ds.process import hard_exit

                hard_exit(self.EXIT_STATUS)


def all_gather_object(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in a lone process)."""
    if dist.is_initialized() and world() > 1:
        out = [None] * world()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def init_from_env() -> bool:
    """Initialize torch.distributed without DeepSpeed when launched by torchrun / the deepspeed launcher (``RANK`` in
    the env; the evaluation CLIs): NCCL with CUDA (device = ``LOCAL_RANK``), gloo otherwise.  Returns True when
    running distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
        return False
    import_dynamo_first()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return True


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: every rank gets the same number of examples (strided ``i = rank, rank + world, ...``, padded by
# wrapping around), computes per-example records carrying their ``index``, and :func:`gather_records` returns the
# union ordered by index with the padding duplicates dropped.  With or without an initialized process group.
# ---------------------------------------------------------------------------------------------------------------
def shard_indices(n: int, rank: int, world: int) -> list[int]:
    """Example indices for ``rank``: strided, padded (wrapping around) so every rank has ``ceil(n / world)``.

    Example: ``n = 5, world = 2`` -> rank 0 ``[0, 2, 4]``, rank 1 ``[1, 3, 0]`` (the trailing 0 is padding).
    """
    if n == 0:
        return []
    per_rank = -(-n // world)
    return [(rank + k * world) % n for k in range(per_rank)]


def gather_records(records: list[dict]) -> list[dict]:
    """All ranks' records (dicts with an integer ``"index"``), ordered by index, first copy of each index kept.
    Returned on every rank."""
    records = [r for part in all_gather_object(records) for r in part]
    out, seen = [], set()
    for r in sorted(records, key=lambda r: r["index"]):
        if r["index"] not in seen:
            seen.add(r["index"])
            out.append(r)
    return out


def max_across_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The maximum of an integer over ranks (to run the same number of forward passes everywhere)."""
    if world() < 2:
        return value
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    return int(all_reduce_max(torch.tensor([value], dtype=torch.long, device=device)).item())
