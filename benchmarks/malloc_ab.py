"""palu_ds's training step on glibc's malloc against jemalloc (``PALU_DS_MALLOC``, palu_ds.localrun), alternating
rounds, on SmolLM2-135M-Instruct (issue 29: where the peak RSS palu_ds showed above open-unlearning's went)::

    python -m benchmarks.malloc_ab --method grad_diff --rounds 3 --out runs/malloc_ab   # needs libjemalloc2

Each run is benchmarks/vs_open_unlearning.py's palu_ds run (TOFU forget10 / retain90, 4 forget + 4 retain rows a
step, max length 128, lr 1e-5, fp32, 1 process, ``ds_configs/cpu/zero0.json``, 2 threads): tokens/s = median over
steps 3..N, peak RSS = ru_maxrss of the training process.  Each round runs glibc first, then jemalloc.  Writes
``results.json`` and ``table.md`` (medians over rounds, range in brackets, and the per-round jemalloc / glibc
ratios)."""

from __future__ import annotations

import os
import statistics

from benchmarks.output import bench_parser, parse_bench, write_results
from benchmarks.vs_open_unlearning import palu_run
from palu_ds.localrun import MALLOC_VAR, jemalloc
from palu_ds.methods import METHODS

ALLOCATORS = {"glibc": "system", "jemalloc": "jemalloc"}  # the name in the table -> PALU_DS_MALLOC


def run_round(method: str, model: str, a, r: int) -> dict[str, dict]:
    """One run per allocator: ``{"glibc": palu_run result, "jemalloc": ...}``."""
    out = {}
    for name, value in ALLOCATORS.items():
        os.environ[MALLOC_VAR] = value  # cpu_env (palu_run's child environment) reads it
        out[name] = palu_run(method, 1, model, a, f"r{r}_{method}_{name}")
        assert out[name].get("malloc", name) == name, out[name]
    return out


def table(rounds: list[dict[str, dict]]) -> str:
    """Medians over rounds (range) per allocator, and the median per-round jemalloc / glibc ratios."""
    ok = [x for x in rounds if all(v["exit"] == 0 for v in x.values())]
    if not ok:
        return "every round failed (see the logs)"

    def med(name, key):
        v = [x[name][key] for x in ok]
        return f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"

    def ratio(key):
        return statistics.median(x["jemalloc"][key] / x["glibc"][key] for x in ok)

    return "\n".join(["| allocator | tokens/s | peak RSS (MiB) |", "|---|---|---|"] +
                     [f"| {n} | {med(n, 'tokens_per_s')} | {med(n, 'peak_rss_mib')} |" for n in ALLOCATORS] +
                     [f"| jemalloc / glibc, median of {len(ok)} rounds | {ratio('tokens_per_s'):.3f}x | "
                      f"{ratio('peak_rss_mib'):.3f}x |"])


def main(argv=None) -> int:
    p = bench_parser(__doc__, "runs/malloc_ab", 10, tofu=True)
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default=os.path.expanduser("~/.cache/palu_ds/models/SmolLM2-135M-Instruct"))
    a = parse_bench(p, argv)
    if jemalloc() is None:
        raise SystemExit("error: this machine has no jemalloc: apt install libjemalloc2")
    a.tofu, a.out = os.path.abspath(a.tofu), os.path.abspath(a.out)
    rounds = []
    for r in range(a.rounds):
        rounds.append(run_round(a.method, os.path.abspath(a.model), a, r))
        print({k: {m: round(v.get(m, 0), 1) for m in ("tokens_per_s", "peak_rss_mib")} for k, v in rounds[-1].items()},
              flush=True)
    write_results(a.out, {"method": a.method, "steps": a.steps, "rounds": rounds}, table(rounds))
    return 0 if all(v["exit"] == 0 for x in rounds for v in x.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
