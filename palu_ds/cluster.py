"""Cluster plumbing for the SLURM scripts: SLURM's compressed node lists, DeepSpeed hostfiles, master address/port.

SLURM hands a job its nodes in a compressed form (``SLURM_JOB_NODELIST=gpu[01-04,07],login2``) and its tasks per
node as ``SLURM_TASKS_PER_NODE=8(x4),4``. The sbatch scripts in ``slurm/`` prefer ``scontrol show hostnames``; this
module is the same expansion in pure Python (no SLURM needed, so it is unit-tested anywhere) and the hostfile
writer, used by the scripts when ``scontrol`` is missing and by ``python -m palu_ds.cluster``::

    python -m palu_ds.cluster expand 'node[01-04,07]'          # one host per line
    python -m palu_ds.cluster hostfile OUT [--slots N]          # from SLURM_JOB_NODELIST; prints MASTER_ADDR PORT

Hostlist grammar (as SLURM's ``hostlist.c``): comma-separated items; a comma inside ``[...]`` separates ranges,
not items; an item may hold several bracket groups (``rack[1-2]-n[1-3]``, expanded as a cartesian product, the
first group varying slowest); a range ``lo-hi`` is zero-padded to the width of ``lo`` when ``lo`` has a leading
zero (``[08-10]`` -> 08 09 10; ``[8-10]`` -> 8 9 10). Duplicates are kept, order is preserved.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys

from palu_ds.atomic import write_text
from palu_ds.process import refusing

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_REPEAT = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


class HostlistError(ValueError):
    pass


def _split_top(spec: str) -> list[str]:
    """Split on the commas that are outside brackets."""
    items, depth, cur = [], 0, []
    for ch in spec:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise HostlistError(f"nested '[' in {spec!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise HostlistError(f"unbalanced ']' in {spec!r}")
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise HostlistError(f"unbalanced '[' in {spec!r}")
    items.append("".join(cur))
    return [i.strip() for i in items if i.strip()]


def _expand_ranges(body: str, spec: str) -> list[str]:
    """``01-04,07`` -> ['01', '02', '03', '04', '07']."""
    out = []
    for part in body.split(","):
        m = _RANGE.match(part.strip())
        if not m:
            raise HostlistError(f"bad range {part!r} in {spec!r}")
        lo_s, hi_s = m.group(1), m.group(2) or m.group(1)
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise HostlistError(f"descending range {part!r} in {spec!r}")
        out += [str(i).zfill(len(lo_s)) for i in range(lo, hi + 1)]  # zero-padded to the width of lo
    return out


def expand_nodelist(spec: str) -> list[str]:
    """SLURM's compressed host list -> host names: ``node[01-02,07],gpu1`` -> node01 node02 node07 gpu1."""
    hosts = []
    for item in _split_top(spec.strip()):
        pieces = re.split(r"(\[[^\]]*\])", item)  # literal, [ranges], literal, [ranges], ...
        choices = [[p] if not p.startswith("[") else _expand_ranges(p[1:-1], spec) for p in pieces if p]
        hosts += ["".join(c) for c in itertools.product(*choices)]
    return hosts


def expand_tasks_per_node(spec: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` (``2(x3),1``) -> [2, 2, 2, 1]."""
    out = []
    for part in spec.split(","):
        m = _REPEAT.match(part.strip())
        if not m:
            raise HostlistError(f"bad tasks-per-node entry {part!r} in {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def hostfile_text(hosts: list[str], slots) -> str:
    """DeepSpeed hostfile lines ``host slots=N``; ``slots`` is one int for every host or one per host."""
    per_host = list(slots) if isinstance(slots, (list, tuple)) else [int(slots)] * len(hosts)
    if len(per_host) != len(hosts):
        raise ValueError(f"{len(hosts)} hosts but {len(per_host)} slot counts")
    if len(set(hosts)) != len(hosts):
        raise ValueError(f"duplicate hosts in {hosts}: a DeepSpeed hostfile names each host once")
    if not hosts or any(int(s) < 1 for s in per_host):
        raise ValueError(f"a hostfile needs at least one host and slots >= 1 (hosts {hosts}, slots {per_host})")
    return "".join(f"{h} slots={int(s)}\n" for h, s in zip(hosts, per_host))


def write_hostfile(path: str, hosts: list[str], slots) -> str:
    return write_text(path, hostfile_text(hosts, slots))


def master_port(job_id: str | int | None, base: int = 20000, span: int = 20000) -> int:
    """A port derived from the job id, so two jobs sharing a node do not collide (same on every node and on a
    requeue of the same job)."""
    return base + int(job_id) % span if job_id not in (None, "") else base + 9500


def slurm_layout(env=None) -> dict:
    """Hosts, slots per host, master address and port of the current SLURM job (from its environment).

    Slots: ``PALU_SLOTS_PER_NODE`` if set, else the GPUs on the node (``SLURM_GPUS_ON_NODE``), else the tasks per
    node (``SLURM_TASKS_PER_NODE``, one count per host)."""
    env = os.environ if env is None else env
    spec = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not spec:
        raise RuntimeError("SLURM_JOB_NODELIST is not set: not inside a SLURM allocation")
    hosts = expand_nodelist(spec)
    if env.get("PALU_SLOTS_PER_NODE"):
        slots = [int(env["PALU_SLOTS_PER_NODE"])] * len(hosts)
    elif env.get("SLURM_GPUS_ON_NODE", "0") not in ("", "0"):
        slots = [int(env["SLURM_GPUS_ON_NODE"])] * len(hosts)
    elif env.get("SLURM_TASKS_PER_NODE"):
        slots = expand_tasks_per_node(env["SLURM_TASKS_PER_NODE"])
    else:
        slots = [1] * len(hosts)
    return {"hosts": hosts, "slots": slots, "master_addr": env.get("PALU_MASTER_ADDR") or hosts[0],
            "master_port": int(env.get("PALU_MASTER_PORT") or master_port(env.get("SLURM_JOB_ID")))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m palu_ds.cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("expand", help="print the hosts of a SLURM node list, one per line")
    e.add_argument("nodelist")
    h = sub.add_parser("hostfile", help="write a DeepSpeed hostfile for this job; print 'MASTER_ADDR MASTER_PORT'")
    h.add_argument("out")
    h.add_argument("--nodelist", help="default: $SLURM_JOB_NODELIST")
    h.add_argument("--slots", type=int, help="slots per host (default: GPUs on the node, else tasks per node)")
    args = p.parse_args(argv)
    return refusing(lambda: _command(args), (HostlistError, ValueError, RuntimeError))


def _command(args) -> None:
    if args.cmd == "expand":
        print("\n".join(expand_nodelist(args.nodelist)))
        return
    env = dict(os.environ)
    if args.nodelist:
        env["SLURM_JOB_NODELIST"] = args.nodelist
    if args.slots:
        env["PALU_SLOTS_PER_NODE"] = str(args.slots)
    lay = slurm_layout(env)
    write_hostfile(args.out, lay["hosts"], lay["slots"])
    print(lay["master_addr"], lay["master_port"])


if __name__ == "__main__":
    sys.exit(main())
