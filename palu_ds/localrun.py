"""Running on this machine's CPUs: one home for the DeepSpeed/gloo CPU settings, the memory allocator, a free port
and the launcher command, used by ``make``, the tests, the demo and the benchmarks.

The library itself leaves the environment alone, so that it runs unchanged on GPUs; whoever starts processes on CPUs
takes the settings from here::

    python -m palu_ds.localrun python -m pytest tests     # a command under CPU_ENV (what the Makefile does)
    setdefaults()                                         # this process (tests/conftest.py, a benchmark's main)
    subprocess.run(launcher_cmd("launch/train.py", args, nproc=2, port=free_port()), env=cpu_env())
"""

from __future__ import annotations

import ctypes.util
import functools
import glob
import os
import socket
import sys

from palu_ds.process import refusing

#: DeepSpeed on the CPU accelerator, gloo over loopback, one OpenMP thread a rank, nothing from the network
CPU_ENV = {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
           "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}
#: set by a launcher for its children: a child process started from a rank must not inherit them
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
#: ``PALU_DS_MALLOC``: unset (LD_PRELOAD as it is), ``jemalloc`` (preloaded; the system must have it) or ``system``
MALLOC_VAR, MALLOC_CHOICES = "PALU_DS_MALLOC", ("jemalloc", "system")
#: allocators a user may already preload (then left alone)
ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@functools.lru_cache(maxsize=1)
def jemalloc() -> str | None:
    """The system's jemalloc (``apt install libjemalloc2``) as a library name ``LD_PRELOAD`` takes, or None."""
    return ctypes.util.find_library("jemalloc")


def set_malloc(env) -> None:
    """``env``'s ``LD_PRELOAD`` (what the processes started with ``env`` get) per ``PALU_DS_MALLOC``: ``jemalloc``
    puts jemalloc in front unless an allocator is preloaded already, ``system`` takes jemalloc out (glibc's malloc),
    unset leaves it as it is.  Measured on SmolLM2 (BENCHMARKS, issue 29, ``benchmarks/malloc_ab.py``): jemalloc
    takes 0.43 GiB (0.90x) off a training step's peak RSS (glibc keeps the 2-6 MiB activation and gradient blocks a
    step frees as heap) at 0.94x the tokens/s -- a choice, not the default.  Example, on a machine with libjemalloc2:
    ``{"PALU_DS_MALLOC": "jemalloc", "LD_PRELOAD": "libfoo.so"}`` -> ``LD_PRELOAD`` ``libjemalloc.so.2:libfoo.so``.
    Another ``PALU_DS_MALLOC``, or ``jemalloc`` on a machine without it: ValueError, ``env`` unchanged."""
    choice = env.get(MALLOC_VAR) or None
    if choice is None:
        return
    if choice not in MALLOC_CHOICES:
        raise ValueError(f"{MALLOC_VAR}={choice!r}: choose {' or '.join(MALLOC_CHOICES)}, or leave it unset")
    entries = [x for x in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if x]
    if choice == "system":
        entries = [x for x in entries if "jemalloc" not in x]
    elif not any(a in x for x in entries for a in ALLOCATORS):
        if jemalloc() is None:
            raise ValueError(f"{MALLOC_VAR}=jemalloc but the system has no jemalloc: install it (apt install "
                             f"libjemalloc2) or unset {MALLOC_VAR}")
        entries = [jemalloc()] + entries
    if entries:
        env["LD_PRELOAD"] = ":".join(entries)
    else:
        env.pop("LD_PRELOAD", None)


def malloc_of(env) -> str:
    """The allocator the processes started with ``env`` run on: ``"jemalloc"`` when its ``LD_PRELOAD`` names it, else
    ``"glibc"``."""
    return "jemalloc" if "jemalloc" in env.get("LD_PRELOAD", "") else "glibc"


def torch_extensions_dir() -> str:
    """Where DeepSpeed's JIT-built CPU ops go: ``$TORCH_EXTENSIONS_DIR``, else ``<venv>/torch_extensions`` (built once
    per environment, not in the user's home)."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(sys.prefix, "torch_extensions")


def setdefaults(env=None) -> None:
    """Fill the CPU settings (and the extensions folder) into ``env`` (default ``os.environ``) where not set; its
    ``LD_PRELOAD`` per ``PALU_DS_MALLOC`` (:func:`set_malloc`)."""
    env = os.environ if env is None else env
    for k, v in CPU_ENV.items():
        env.setdefault(k, v)
    env.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    set_malloc(env)


def cpu_env(**extra: str) -> dict:
    """The environment of a child process: this one, the CPU settings on top, no rank variables of a parent
    launcher, then ``extra`` (e.g. ``OMP_NUM_THREADS="2"``), then ``LD_PRELOAD`` per ``PALU_DS_MALLOC``
    (:func:`set_malloc`)."""
    env = dict(os.environ)
    env.update(CPU_ENV, TORCH_EXTENSIONS_DIR=torch_extensions_dir())
    for k in RANK_VARS:
        env.pop(k, None)
    env.update(extra)
    set_malloc(env)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for ``--master_port``) that no DeepSpeed CPU shared-memory buffer in
    /dev/shm names: a job killed before palu_ds.dist.release_shm_name (or another framework's job) leaves
    ``deepspeed_allreduce_buffer_*_<port>_<rank>`` behind, and a new job on that port would map the stale file."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not shm_buffers(port):
            return port


#: DeepSpeed's CPU shared-memory all-reduce buffer of one rank is ``<SHM_BUFFER><uid>_<addr>_<port>_<rank>``
#: (ops/csrc/cpu/comm/shm.cpp, ~66 MB each; palu_ds.dist.shm_buffer_path names this rank's)
SHM_BUFFER = "/dev/shm/deepspeed_allreduce_buffer_"


def shm_buffers(port: int) -> list[str]:
    """The DeepSpeed CPU shared-memory all-reduce buffers in /dev/shm that name master port ``port``."""
    return glob.glob(f"{SHM_BUFFER}*_{port}_*")


def launcher_cmd(script: str, args: list[str] = (), nproc: int = 2, port: int | None = None,
                 torchrun: bool = False) -> list[str]:
    """``deepspeed --num_gpus N --master_port P script args`` (N > 1; on CPU, N processes; ``torchrun``: ``torchrun
    --nproc_per_node N --master_port P script args``) or ``python script args`` (one process), with this
    interpreter."""
    if nproc <= 1:
        return [sys.executable, script, *args]
    port = str(port if port is not None else free_port())
    if torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
                script, *args]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port,
            script, *args]


def main(argv: list[str]) -> None:
    """``python -m palu_ds.localrun CMD ...``: run CMD with the CPU settings filled in where not set."""
    if not argv:
        raise SystemExit("usage: python -m palu_ds.localrun COMMAND [ARGS...]")
    status = refusing(setdefaults, ValueError)  # a bad PALU_DS_MALLOC: named, exit 2
    if status:
        raise SystemExit(status)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
