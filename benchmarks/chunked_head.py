"""Benchmark (not a test): the LM head + every loss term of a step, dense vs chunked (issue 17), one process, CPU.

    python benchmarks/chunked_head.py                          # V=128256, d=2048, 4096 answer positions, fp32, PALU
    python benchmarks/chunked_head.py --method npo --rounds 1  # another method of the registry
    python benchmarks/chunked_head.py --quick                  # small sizes, seconds

What runs is the engine's code path after the backbone: packed last hidden states of the answer positions
(a leaf, standing for the backbone's output) -> ``palu_ds.methods`` terms of ``--method`` -> objective -> backward
(gradients to the hidden states and the head weight), with

  dense:     PackedLogits(lm_logits(head, h))         -- the [N, V] logits at once (train.head_path=dense)
  chunked:   lm_head.chunked_logits(head, ..., h)     -- head + losses a chunk of positions at a time, each chunk's
                                                         gradient formed in the forward pass from the objective's
                                                         seeds (train.head_path=chunked, issue 29)
  recompute: the same with fuse=False                 -- logits recomputed in backward (issue 17's path;
                                                         ``--variants dense,chunked,recompute``)

Half of the positions are the forget batch (PALU: every 4th one in I_init with K reference ids, the rest "common"
with k=256 reference ids and log-probs), half the retain batch.  Each variant runs in a FRESH subprocess: its memory
figure is the peak resident set (VmHWM, reset through /proc/self/clear_refs after the set-up) minus the resident set
just before the stage -- i.e. what the head + losses + their backward add on top of the weight, the hidden states and
the reference tensors (the head's gradient included, in both variants).  Time: one warm-up then the best of
``--reps`` forward+backward passes (wall and CPU time; on a shared machine the CPU time is the steadier one).
Variants alternate ``--rounds`` times (dense, chunked, dense, chunked, ...) so that a noisy neighbour hits them
alike; the table reports the best time and the largest peak of each variant against dense (``--reps 0``: one pass,
no warm-up), and each chunked variant's rows fused / recomputed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _inputs(m, a):
    """Random batches of the method's batches (``a.positions`` answer positions in all, every 4th one sensitive)
    and reference tensors for them: ``(names, batches, answer masks, ref)``."""
    import torch

    from palu_ds.batch import IGNORE_INDEX

    V, N = a.vocab, a.positions
    names = [n for n in m.batches if n != "idk"] + (["idk"] if "idk" in m.batches else [])
    per = N // len(names)
    B = 2
    T = per // B + 1
    batches, answers = {}, {}
    for n in names:
        ids = torch.randint(0, V, (B, T))
        labels = ids.clone()
        labels[:, 0] = IGNORE_INDEX
        sens = torch.zeros(B, T, dtype=torch.bool)
        sens[:, 1::4] = True
        batches[n] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "sens_mask": sens,
                      "common_mask": (labels != IGNORE_INDEX) & ~sens}
        answers[n] = labels[:, 1:] != IGNORE_INDEX
    ref = {}
    for n, b in batches.items():
        n_sens, n_common = int(b["sens_mask"][:, 1:].sum()), int(b["common_mask"][:, 1:].sum())
        ref[n] = {"topk_ids": torch.randint(0, V, (n_sens, a.K)).int(),
                  "kl_ids": torch.randint(0, V, (n_common, a.k)).int(),
                  "kl_logps": torch.full((n_common, a.k), -8.0),
                  "seq_logps": torch.full((B,), -float(T) * 5)}
    return names, batches, answers, ref


def child(a) -> dict:
    from functools import partial

    import torch

    from palu_ds.batch import PackedLogits
    from palu_ds.lm_head import HeadSpec, chunked_logits, lm_logits, within_head
    from palu_ds.methods import StepInputs, get_method

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    V, d, N = a.vocab, a.hidden, a.positions
    m = get_method(a.method)
    head = torch.nn.Linear(d, V, bias=False)
    with torch.no_grad():
        head.weight.normal_(0.0, d ** -0.5)                  # in place: the set-up never peaks above its end state
    spec = HeadSpec("bench")
    names, batches, answers, ref = _inputs(m, a)
    hp = {"K": a.K, "kl_topk": a.k} if "K" in m.defaults else {}
    hidden = torch.randn(sum(int(x.sum()) for x in answers.values()), d, requires_grad=True)

    objective = partial(m.objective, hp=hp, lam=1.0)
    rows_done = {}

    def step():
        head.weight.grad, hidden.grad = None, None
        if a.variant == "dense":
            rows = lm_logits(head, hidden, spec).split([int(x.sum()) for x in answers.values()])
            logits = {n: PackedLogits(r, answers[n]) for n, r in zip(names, rows)}
        else:
            logits = chunked_logits(head, spec, hidden, answers, a.chunk_elems, fuse=a.variant == "chunked")
        heads = []

        def terms_of(lg):
            heads.extend(v.chunked for v in lg.values() if hasattr(v, "chunked"))
            return m.terms(StepInputs(logits=lg, batches=batches, ref=ref), hp)

        terms = within_head(logits, terms_of, objective)
        objective(terms).backward()
        rows_done.update(heads[-1].stats() if heads else {})
        return {k: float(v) for k, v in terms.items()}

    rss_before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                         # reset the peak resident set (VmHWM) to now
    times, cpu, terms = [], [], None
    for _ in range(1 + a.reps):
        t0, c0 = time.perf_counter(), _cpu_s()
        terms = step()
        times.append(time.perf_counter() - t0)
        cpu.append(_cpu_s() - c0)
    peak = _status_kb("VmHWM")
    return {"variant": a.variant, "method": a.method, "V": V, "d": d, "positions": int(hidden.shape[0]),
            "chunk_elems": a.chunk_elems, "baseline_gib": rss_before / 2**20,
            "stage_peak_gib": (peak - rss_before) / 2**20, "times_s": times, "best_s": min(times[1:] or times),
            "cpu_s": cpu, "best_cpu_s": min(cpu[1:] or cpu),
            "rows": rows_done, "terms": terms, "grad_w_norm": float(head.weight.grad.norm()), "grad_h_norm": float(hidden.grad.norm())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="palu")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--K", type=int, default=5000)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--chunk-elems", type=int, default=1 << 24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="dense,chunked", help="dense first, then chunked and/or recompute")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.vocab, a.hidden, a.positions, a.K, a.rounds = 8000, 256, 512, 500, 1
    if a.variant:
        print(json.dumps(child(a)))
        return
    variants = a.variants.split(",")
    if variants[0] != "dense" or not set(variants[1:]) <= {"chunked", "recompute"}:
        raise SystemExit(f"--variants: dense first, then chunked and/or recompute; got {a.variants!r}")
    results = {v: [] for v in variants}
    for r in range(a.rounds):
        for variant in variants:
            args = [sys.executable, os.path.abspath(__file__), "--variant", variant] + sys.argv[1:]
            out = subprocess.run(args, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[variant].append(res)
            print(f"round {r} {variant}: stage peak {res['stage_peak_gib']:.2f} GiB over a baseline of "
                  f"{res['baseline_gib']:.2f} GiB, times {['%.2f' % t for t in res['times_s']]} s "
                  f"(CPU {['%.2f' % t for t in res['cpu_s']]} s), terms {res['terms']} {res['rows']}", flush=True)
    dn = results["dense"]
    mem = {v: max(x["stage_peak_gib"] for x in res) for v, res in results.items()}
    t = {v: min(x["best_s"] for x in res) for v, res in results.items()}
    c = {v: min(x["best_cpu_s"] for x in res) for v, res in results.items()}
    for v in variants[1:]:  # the paths compute the same step
        ch = results[v]
        for key in dn[0]["terms"]:
            rel = abs(dn[0]["terms"][key] - ch[0]["terms"][key]) / max(1e-12, abs(dn[0]["terms"][key]))
            print(f"{v} term {key}: dense {dn[0]['terms'][key]:.6g} {v} {ch[0]['terms'][key]:.6g} "
                  f"(rel diff {rel:.1e})")
        print(f"{v} grad W norm: dense {dn[0]['grad_w_norm']:.6g} {v} {ch[0]['grad_w_norm']:.6g}; "
              f"grad h norm: dense {dn[0]['grad_h_norm']:.6g} {v} {ch[0]['grad_h_norm']:.6g}")
    print("\n| method | V | d | positions | chunk (logit elements) | variant | rows fused / recomputed | peak (GiB) | "
          "memory vs dense | wall (s) | speed vs dense (wall) | CPU (s) | speed vs dense (CPU time) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        rows = results[v][0]["rows"]
        done = f"{rows['fused_rows']} / {rows['recomputed_rows']}" if rows else "-"
        print(f"| {a.method} | {a.vocab} | {a.hidden} | {dn[0]['positions']} | {a.chunk_elems} | {v} | {done} | "
              f"{mem[v]:.2f} | {mem[v] / mem['dense']:.3f}x | {t[v]:.2f} | {t['dense'] / t[v]:.3f}x | {c[v]:.2f} | "
              f"{c['dense'] / c[v]:.3f}x |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
