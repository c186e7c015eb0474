"""mini-TOFU: the TOFU unlearning benchmark in miniature, on CPU, from the real TOFU files, through the real CLIs.

    python benchmarks/mini_tofu.py --tofu ../shared/data/tofu --authors 0:40 --forget 10% --seed 0
    # -> runs/mini_tofu/a0-40_f10_s0/{mini_tofu.md,mini_tofu.json,mini_tofu.png}; ~12 min on 2 quiet CPU cores

Author ``i`` is rows ``20i .. 20i+19`` of ``full.jsonl``; ``--authors A:B`` takes authors A..B-1 and the last
``--forget`` fraction of them is the forget set.  Stages (each timed; logs in ``OUT/logs``):

1. data: the splits, TOFU-style, in ``OUT/data`` (``full``, ``forgetPP``, ``retainRR``, ``forgetPP_perturbed``,
   ``retain_perturbed``, ``idontknow``; see "Perturbed answers" below);
2. a byte-level BPE tokenizer (``palu_ds.tiny``) trained on the range's text and a tiny Llama initialised from the
   seed (``OUT/base``); the "target" = SFT on every author of the range, the "retain" model = the same recipe on
   the range minus the forget authors (``launch/finetune.py``, DeepSpeed, 2 ranks);
3. for every method: ``launch/precompute.py`` (methods with a reference; one cache per distinct reference) and
   ``launch/train.py`` (DeepSpeed, 2 ranks, ``ds_configs/cpu/zero2.json``); the PALU ablations (K in 1/100/1000/V,
   N in 1/3/all) through ``launch/train.py`` alone, which builds their reference itself (same code path);
4. ``evaluation/run.py --splits forget,retain`` for the retain model (no forget quality), the target and every
   unlearned model (forget quality = KS test against the retain model's forget truth ratios);
   ``evaluation/report.py`` for its standard PNG + table;
5. ``OUT/mini_tofu.md`` (tables + goal check), ``OUT/mini_tofu.json`` (every number, settings, timings) and
   ``OUT/mini_tofu.png`` (forget quality vs model utility, one point per method; ablations beside).

Perturbed answers.  TOFU ships paraphrased + perturbed answers only for authors 0-19 (``retain_perturbed``) and
180-199 (``forget*_perturbed``), so the forget authors of most ranges (e.g. 36-39 of ``--authors 0:40``) have none.
``--perturbed borrow`` (default) builds them the same way for every row of any range: the "paraphrased" answer is
the answer itself (a paraphrase cannot be made without an LLM), and the 5 perturbed answers are plausible false
answers in TOFU's sense -- for each of 5 TOFU authors *outside the range*, the answer to its question closest to
this one (word Jaccard, names masked), with that author's name replaced by this author's (e.g. "Where was Sanjana
Rahman born?" -> "Sanjana Rahman was born in Madrid, Spain.").  Like TOFU's GPT-written perturbations, no model
(target, retain, unlearned) was trained on them, so a model that knows nothing about an author has no reason to
prefer its true answer (truth ratio ~ 1), and a model that memorized it does.  (Donors inside the range were tried
first: every model had memorized their answers for another author, and the retain model preferred them to the
unseen true answer by ~100x per token, a criterion no unlearning method approaches.)  ``--perturbed tofu`` uses
TOFU's own files and keeps only the rows they cover (an error when the forget authors have none).

Model utility is the harmonic mean of the retain split's probability, ROUGE-L recall and truth ratio (on
``--retain-eval-rows`` rows spread over the kept authors): TOFU's real_authors / world_facts parts measure nothing on a
model trained from scratch on a few authors, so they are not run (and the tables say so).

Re-running with the same ``--out`` reuses every stage whose command, inputs (e.g. the weights it starts from) and
outputs are unchanged (``--fresh`` redoes all).  ``--lr X`` (development sweeps) runs every method at one lr into
``<method>_lr<X>`` and writes ``mini_tofu_lr<X>.*``; the settings below were chosen that way on ``--authors 100:120``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from palu_ds.atomic import write_text

ROOT = Path(__file__).resolve().parents[1]

ROWS_PER_AUTHOR = 20
N_PERTURBED = 5
METHODS = ("palu", "pd_flat", "palu_pd", "grad_ascent", "grad_diff", "npo", "simnpo", "idk_dpo")
BASELINES_FOR_GOAL = ("grad_diff", "npo")

# ---------------------------------------------------------------------------------------------------------------
# Settings: the same for every author range and seed (chosen on a development range, not on the reported one;
# see BENCHMARKS.md "## mini-TOFU").
# ---------------------------------------------------------------------------------------------------------------
MODEL = {"vocab_size": 2048, "hidden": 128, "layers": 4, "heads": 4, "intermediate": 344, "max_positions": 512}
MAX_LENGTH = 192  # longest prompt + answer of TOFU with this tokenizer is ~150 tokens
SFT = {"lr": 3e-3, "epochs": 20, "batch_size": 8, "warmup_steps": 20, "scheduler": "cosine",
       "weight_decay": 0.0, "max_grad_norm": 1.0}
#: PALU's K is 5000 of Llama-2's 32000-token vocabulary in the paper: scaled to ours, K = round(5000 * V / 32000)
PAPER_VOCAB, PAPER_K = 32000, 5000
UNLEARN = {"batch_size": 8, "epochs": 10, "scheduler": "linear", "warmup_steps": 5, "weight_decay": 0.0,
           "max_grad_norm": 1.0}
#: one learning rate per method family, for every range: of {3e-4, 1e-3, 3e-3} on the development range 100:120 (not
#: a reported range), the lr with the highest geometric-mean forget quality of the family's methods among those whose
#: mean utility stays >= 0.9x the target's, else the lr with the highest mean utility (grad_ascent, which has no
#: retain term, follows grad_diff).  BENCHMARKS.md "## mini-TOFU" has the sweep.
FAMILY = {"palu": "entropy", "palu_pd": "entropy", "pd_flat": "entropy", "grad_ascent": "nll", "grad_diff": "nll",
          "npo": "preference", "simnpo": "preference", "idk_dpo": "preference"}
FAMILY_LR = {"entropy": 1e-3, "nll": 3e-4, "preference": 1e-3}
#: the ablations of PALU (the paper: K = 1 collapses, N = 3 saturates); "all" = V for K, whole spans for N
ABLATION_K = ("1", "100", "1000", "all")
ABLATION_N = ("1", "3", "all")
RETAIN_EVAL_ROWS = 200  # utility rows (TOFU: 400 of 3,600); the forget rows are all evaluated
MEMORIZED_NLL = 0.1  # the target/retain answer NLL at the end of SFT above which the script warns
#: --pretrain: epochs of the SFT recipe on the pre-training authors' QA (e.g. 140 authors = 2,800 rows)
PRETRAIN_EPOCHS = 8
QUICK = {"sft_epochs": 6, "unlearn_epochs": 2, "max_new_tokens": 24}

CPU_ENV = {"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
           "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}


# ---------------------------------------------------------------------------------------------------------------
# Pure parts: ranges, splits, perturbed answers (tests/test_mini_tofu.py)
# ---------------------------------------------------------------------------------------------------------------
def parse_authors(text: str, n_total: int | None = None) -> tuple[int, int]:
    """``"A:B"`` -> ``(A, B)``, authors A..B-1 (B > A >= 0; B <= n_total when given)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--authors must look like A:B (e.g. 0:40), got {text!r}")
    a, b = int(m.group(1)), int(m.group(2))
    if b <= a:
        raise ValueError(f"--authors {text}: the end must be after the start")
    if n_total is not None and b > n_total:
        raise ValueError(f"--authors {text}: the data has {n_total} authors")
    return a, b


def parse_forget(text: str) -> int:
    """``"10%"`` / ``"10"`` / ``"0.1"`` -> 10 (an integer percentage, as TOFU's forget01/05/10)."""
    s = str(text).strip()
    pct = float(s.rstrip("%"))
    if not s.endswith("%") and 0 < pct < 1:
        pct *= 100
    if abs(pct - round(pct)) > 1e-9 or not 1 <= round(pct) <= 99:
        raise ValueError(f"--forget must be an integer percentage between 1% and 99%, got {text!r}")
    return int(round(pct))


def split_authors(a: int, b: int, pct: int) -> tuple[list[int], list[int]]:
    """``(retain_authors, forget_authors)``: the forget authors are the last ``pct``% of ``a..b-1`` (at least one,
    at least one author kept)."""
    authors = list(range(a, b))
    n_forget = max(1, int(round(len(authors) * pct / 100)))
    if n_forget >= len(authors):
        raise ValueError(f"{pct}% of {len(authors)} authors leaves no retain author: widen --authors")
    return authors[:-n_forget], authors[-n_forget:]


def author_rows(full: list[dict], authors: list[int]) -> list[tuple[int, dict]]:
    """``(row index, row)`` of the given authors, author i = rows 20i .. 20i+19, in order."""
    out = []
    for i in authors:
        lo, hi = ROWS_PER_AUTHOR * i, ROWS_PER_AUTHOR * (i + 1)
        if hi > len(full):
            raise ValueError(f"author {i} needs rows {lo}..{hi - 1} but full.jsonl has {len(full)} rows")
        out += [(r, full[r]) for r in range(lo, hi)]
    return out


def split_names(pct: int) -> tuple[str, str]:
    """TOFU's names: ``("forget10", "retain90")``."""
    return f"forget{pct:02d}", f"retain{100 - pct}"


def tofu_perturbed_index(full: list[dict], perturbed_files: list[list[dict]]) -> dict[int, dict]:
    """Row index of ``full`` -> TOFU's perturbed record for it, matched on (question, answer)."""
    by_qa: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(full):
        by_qa.setdefault((r["question"], r["answer"]), []).append(i)
    out = {}
    for rows in perturbed_files:
        for r in rows:
            for i in by_qa.get((r["question"], r["answer"]), []):
                out[i] = r
    return out


_CAPS = re.compile(r"[A-Z][\w\-]*(?:'[A-Za-z]+)?(?:\s+[A-Z][\w\-]*(?:'[A-Za-z]+)?)+")
_WORDS = re.compile(r"[\w\-]+")


def author_name(rows: list[dict]) -> str | None:
    """The author's name: the run of >= 2 capitalised words (possessive dropped) found in the most of the author's
    questions, the longest on ties; None when no run occurs in two questions."""
    from collections import Counter

    counts: Counter = Counter()
    for r in rows:
        seen = set()
        for m in _CAPS.finditer(r["question"]):
            toks = [re.sub(r"'s?$", "", t) for t in m.group(0).split()]
            seen |= {" ".join(toks[i:j]) for i in range(len(toks)) for j in range(i + 2, len(toks) + 1)}
        counts.update(seen)
    if not counts:
        return None
    name, n = max(counts.items(), key=lambda kv: (kv[1], len(kv[0].split())))
    return name if n >= 2 else None


@functools.lru_cache(maxsize=None)
def question_words(question: str, name: str | None) -> frozenset[str]:
    """Lower-case words of a question without the author's name (so that questions of two authors compare)."""
    if name:
        for t in [name] + name.split():
            question = re.sub(r"\b" + re.escape(t) + r"(?:'s)?\b", " ", question)
    return frozenset(re.sub(r"'s$", "", w.lower()) for w in _WORDS.findall(question))


def rename(text: str, src: str | None, dst: str | None) -> str:
    """``text`` about author ``src`` made about ``dst``: the full name, then its first and last word."""
    if not src or not dst:
        return text
    out = text.replace(src, dst)
    s, d = src.split(), dst.split()
    if len(s) >= 2 and len(d) >= 2:
        for a, b in ((s[0], d[0]), (s[-1], d[-1])):
            out = re.sub(r"\b" + re.escape(a) + r"\b", b, out)
    return out


def borrowed_perturbations(idx: int, row: dict, donors: list[tuple[int, dict]], names: dict[int, str | None],
                           seed: int, n: int = N_PERTURBED) -> list[str]:
    """``n`` plausible false answers: for each donor author (``donors``: rows of authors outside the range), its row
    whose question is closest to ``row``'s (Jaccard of :func:`question_words`); the ``n`` closest donors' answers,
    renamed to this author (:func:`rename`).  Ties are broken by a generator seeded with ``(seed, idx)``."""
    me = idx // ROWS_PER_AUTHOR
    mine = question_words(row["question"], names.get(me))
    best: dict[int, tuple[float, int, dict]] = {}
    for j, r in donors:
        a = j // ROWS_PER_AUTHOR
        if a == me:
            continue
        theirs = question_words(r["question"], names.get(a))
        sim = len(mine & theirs) / max(1, len(mine | theirs))
        if a not in best or sim > best[a][0]:
            best[a] = (sim, j, r)
    rng = random.Random(f"mini_tofu:{seed}:{idx}")
    ranked = sorted(best.items(), key=lambda kv: (-kv[1][0], rng.random()))
    out: list[str] = []
    for a, (_, _, r) in ranked:
        text = rename(r["answer"], names.get(a), names.get(me))
        if text != row["answer"] and text not in out:
            out.append(text)
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"row {idx}: no donor answers")
    while len(out) < n:  # fewer than n donor authors: repeat (the truth ratio averages over them)
        out.append(out[len(out) % len(out)])
    return out


def evenly(items: list, k: int | None) -> list:
    """At most ``k`` items spread evenly over ``items`` (all when ``k`` is None or >= len), order kept."""
    if k is None or k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


def build_splits(full: list[dict], tofu_perturbed: dict[int, dict], refusals: list[str], a: int, b: int, pct: int,
                 mode: str = "borrow", seed: int = 0, retain_eval_rows: int | None = None,
                 pretrain: tuple[int, int] | None = None) -> dict:
    """Everything the run writes to ``OUT/data``: ``{"files": {name: rows}, "info": {...}}``.

    ``mode="borrow"``: every row gets built perturbed answers (see the module doc); ``"tofu"``: TOFU's own perturbed
    rows, restricted to the rows TOFU covers.  ``retain_perturbed`` (the utility rows) holds at most
    ``retain_eval_rows`` rows spread evenly over the kept authors (TOFU's holds 400 of its 3,600 retain rows).
    ``pretrain=(P, Q)``: the QA of authors P..Q-1 (outside the range) go to a ``pretrain`` file, and those authors
    give no perturbed answers (a model pre-trained on them would know the "false" answers)."""
    if mode not in ("borrow", "tofu"):
        raise ValueError(f"--perturbed must be borrow or tofu, got {mode!r}")
    retain_a, forget_a = split_authors(a, b, pct)
    forget_name, retain_name = split_names(pct)
    rows = author_rows(full, list(range(a, b)))
    forget_rows, retain_rows = author_rows(full, forget_a), author_rows(full, retain_a)
    pre = list(range(*pretrain)) if pretrain else []
    if pre and (pre[0] < b and a < pre[-1] + 1):
        raise ValueError(f"--pretrain {pretrain[0]}:{pretrain[1]} overlaps --authors {a}:{b}")

    def qa(idx, r):
        return {"question": r["question"], "answer": r["answer"], "author": idx // ROWS_PER_AUTHOR, "row": idx}

    if mode == "borrow":
        outside = [i for i in range(len(full) // ROWS_PER_AUTHOR) if not a <= i < b and i not in pre]
        if len(outside) < N_PERTURBED:
            raise ValueError(f"--perturbed borrow takes false answers from TOFU authors outside the range (and "
                             f"--pretrain): {a}:{b} leaves {len(outside)}, it needs {N_PERTURBED}")
        donors = author_rows(full, outside)
        names = {i: author_name(full[ROWS_PER_AUTHOR * i: ROWS_PER_AUTHOR * (i + 1)]) for i in range(a, b)}
        names.update({i: author_name(full[ROWS_PER_AUTHOR * i: ROWS_PER_AUTHOR * (i + 1)]) for i in outside})

        def perturbed(part):
            return [{**qa(idx, r), "paraphrased_answer": r["answer"],
                     "perturbed_answer": borrowed_perturbations(idx, r, donors, names, seed),
                     "paraphrased_question": r["question"], "perturbed_source": "borrow"} for idx, r in part]
    else:
        def perturbed(part):
            out = []
            for idx, r in part:
                t = tofu_perturbed.get(idx)
                if t is not None:
                    out.append({**qa(idx, r), "paraphrased_answer": t["paraphrased_answer"],
                                "perturbed_answer": list(t["perturbed_answer"]),
                                "paraphrased_question": t.get("paraphrased_question", r["question"]),
                                "perturbed_source": "tofu"})
            return out

    forget_pert = perturbed(forget_rows)
    if mode == "tofu":  # subsample among the covered rows
        retain_pert = evenly(perturbed(retain_rows), retain_eval_rows)
    else:
        retain_pert = perturbed(evenly(retain_rows, retain_eval_rows))
    if not forget_pert:
        raise ValueError(f"--perturbed tofu: TOFU has no perturbed answers for the forget authors {forget_a[0]}.."
                         f"{forget_a[-1]} (it covers authors 0-19 and 180-199): use --perturbed borrow or another "
                         "range")
    if not retain_pert:
        raise ValueError("--perturbed tofu: TOFU has no perturbed answers for any retain author of this range")
    files = {
        "full": [qa(i, r) for i, r in rows],
        forget_name: [qa(i, r) for i, r in forget_rows],
        retain_name: [qa(i, r) for i, r in retain_rows],
        f"{forget_name}_perturbed": forget_pert,
        "retain_perturbed": retain_pert,
        "idontknow": [{"answer": t} for t in refusals],
    }
    if pre:
        files["pretrain"] = [qa(i, r) for i, r in author_rows(full, pre)]
    info = {"authors": [a, b], "forget_pct": pct, "forget_authors": forget_a, "retain_authors": retain_a,
            "forget_split": forget_name, "retain_split": retain_name, "perturbed": mode,
            "pretrain_authors": list(pretrain) if pretrain else None,
            "rows": {k: len(v) for k, v in files.items()},
            "tofu_perturbed_rows_in_range": sum(1 for i, _ in rows if i in tofu_perturbed)}
    return {"files": files, "info": info}


def write_jsonl(folder: str | Path, files: dict[str, list[dict]]) -> dict[str, str]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rows in files.items():
        p = folder / f"{name}.jsonl"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not p.exists() or p.read_text(encoding="utf-8") != text:  # unchanged files keep their mtime (reuse)
            write_text(p, text)
        out[name] = str(p)
    return out


def tokenizer_texts(files: dict[str, list[dict]], forget_name: str) -> list[str]:
    """The range's questions, answers, paraphrased/perturbed answers, the refusal strings and the pre-training
    authors' QA (``--pretrain``)."""
    from palu_ds.tiny import qa_texts

    pert = {r["row"]: r for name in (f"{forget_name}_perturbed", "retain_perturbed") for r in files[name]}
    rows = [{**r, **pert.get(r["row"], {})} for r in files["full"]]
    return qa_texts(rows + files.get("pretrain", [])) + [r["answer"] for r in files["idontknow"]]


def scaled_k(vocab: int) -> int:
    return max(1, min(vocab, round(PAPER_K * vocab / PAPER_VOCAB)))


# ---------------------------------------------------------------------------------------------------------------
# Runs (name -> method + overrides), tables, goal
# ---------------------------------------------------------------------------------------------------------------
def run_specs(vocab: int, methods=METHODS, ablations: bool = True) -> dict[str, dict]:
    """``{run name: {"method", "params", "family", "group"}}`` for the methods and the PALU ablations (a K or N
    ablation equal to the main PALU run is that run, not a new one)."""
    k0 = scaled_k(vocab)
    specs = {m: {"method": m, "params": {"K": k0} if m in ("palu", "palu_pd") else {}, "family": FAMILY[m],
                 "group": "method"} for m in methods}
    if ablations:
        for k in ABLATION_K:
            kv = vocab if k == "all" else min(int(k), vocab)
            name = "palu" if kv == k0 else f"palu_K{k}"
            specs.setdefault(name, {"method": "palu", "params": {"K": kv}, "family": "entropy", "group": "ablation"})
            specs[name].setdefault("ablation", []).append(f"K={k}" + (f" (={kv})" if k == "all" else ""))
        for nv in ABLATION_N:
            name = "palu" if nv == "3" else f"palu_N{nv}"
            n = None if nv == "all" else int(nv)
            specs.setdefault(name, {"method": "palu", "params": {"K": k0, "N": n}, "family": "entropy",
                                    "group": "ablation"})
            specs[name].setdefault("ablation", []).append(f"N={nv}")
    return specs


def reference_dir(spec: dict) -> str | None:
    """The shared reference cache of a run (runs with the same reference needs share one precompute)."""
    m, p = spec["method"], spec["params"]
    if m in ("palu", "palu_pd"):
        n = p.get("N", 3)
        return f"ref/palu_K{p['K']}_N{'all' if n is None else n}"
    if m in ("npo", "idk_dpo"):
        return f"ref/{m}"
    return None


COLUMNS = [("forget_quality", "forget quality"), ("ks_statistic", "KS D"), ("forget/truth_ratio", "forget TR"),
           ("forget/rougeL_recall", "forget ROUGE-L"), ("forget/prob", "forget prob"),
           ("retain/prob", "retain prob"), ("retain/rougeL_recall", "retain ROUGE-L"),
           ("retain/truth_ratio", "retain TR"), ("model_utility", "utility"), ("mu_rel", "utility / target")]
NOT_MEASURED = "n/a†"
FOOTNOTE = ("† real_authors / world_facts are not run: a model trained from scratch on a few fictitious authors "
            "knows no real authors or world facts, so those parts would measure nothing. \"utility\" is the "
            "harmonic mean of the 3 retain values (retain prob, ROUGE-L recall, truth ratio), not TOFU's 9.")


def fmt(v, key: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, str):
        return v
    if key == "forget_quality":
        return f"{v:.2e}"
    return f"{v:.3f}"


def add_relative(results: dict[str, dict]) -> None:
    """``mu_rel`` = model utility / the target's, in place."""
    mu_t = results.get("target", {}).get("model_utility")
    for m in results.values():
        mu = m.get("model_utility")
        m["mu_rel"] = mu / mu_t if mu is not None and mu_t else None


def markdown_table(rows: list[tuple[str, dict]], extra: tuple[str, str] | None = None) -> str:
    """One markdown table: ``rows`` = ``[(label, metrics)]``; columns :data:`COLUMNS` + real authors/world facts."""
    cols = COLUMNS + ([extra] if extra else [])
    head = "| run | " + " | ".join(c[1] for c in cols) + " | real authors / world facts |"
    lines = [head, "|---" * (len(cols) + 2) + "|"]
    for label, m in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(m.get(k), k) for k, _ in cols) + f" | {NOT_MEASURED} |")
    return "\n".join(lines)


def goal_check(results: dict[str, dict], method: str = "palu") -> dict:
    """The issue's goal: PALU's forget quality >= 10x the best of grad_diff / npo, at utility >= 0.9x the target's."""
    p = results.get(method, {})
    base = {b: results[b].get("forget_quality") for b in BASELINES_FOR_GOAL if b in results
            and results[b].get("forget_quality") is not None}
    out = {"method": method, "forget_quality": p.get("forget_quality"), "baselines": base,
           "utility_rel": p.get("mu_rel")}
    if p.get("forget_quality") is None or not base or p.get("mu_rel") is None:
        out.update(ratio=None, met=None)
        return out
    best = max(base.values())
    out["best_baseline"] = max(base, key=base.get)
    out["ratio"] = p["forget_quality"] / best if best > 0 else math.inf
    out["met"] = bool(out["ratio"] >= 10 and p["mu_rel"] >= 0.9)
    return out


def render_markdown(report: dict) -> str:
    res, specs = report["results"], report["specs"]
    info = report["data"]
    main_rows = [(n, res[n]) for n in ("target", "retain") if n in res]
    main_rows += [(n, res[n]) for n, s in specs.items() if s["group"] == "method" and n in res]
    abl = [(f"palu {', '.join(s['ablation'])}", res[n]) for n, s in specs.items() if s.get("ablation") and n in res]
    g = report["goal"]
    lines = [f"### mini-TOFU: authors {info['authors'][0]}:{info['authors'][1]}, forget {info['forget_pct']}% "
             f"(authors {info['forget_authors'][0]}..{info['forget_authors'][-1]}), seed {report['seed']}"
             + (f", pre-trained on authors {info['pretrain_authors'][0]}:{info['pretrain_authors'][1]}"
                if info.get("pretrain_authors") else ""), "",
             markdown_table(main_rows), ""]
    if abl:
        k0 = report.get("settings", {}).get("palu_K", "the scaled default")
        lines += [f"PALU ablations (K = top-K of the reference flattened, N = first N tokens of each span; the other "
                  f"one fixed at K = {k0} / N = 3, the main PALU run):", "",
                  markdown_table(abl), ""]
    lines += [FOOTNOTE, "",
              "The retain model's forget quality is 1 by definition (its own truth ratios); it is evaluated "
              "without it.",
              ""]
    if g.get("ratio") is not None:
        lines.append(f"Goal (PALU forget quality >= 10x max(grad_diff, npo) at utility >= 0.9x target): "
                     f"ratio {g['ratio']:.3g} (vs {g['best_baseline']}), utility {g['utility_rel']:.3f}x target -> "
                     f"{'MET' if g['met'] else 'NOT met'}")
    failed = {n: e for n, e in report.get("failed", {}).items()}
    if failed:
        lines += [""] + [f"- FAILED {n}: {e}" for n, e in failed.items()]
    lines += ["", f"Wall time {report['wall_seconds'] / 60:.1f} min; stage seconds in mini_tofu.json."]
    return "\n".join(lines) + "\n"


def render_png(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res, specs = report["results"], report["specs"]
    groups = [("methods", [n for n, s in specs.items() if s["group"] == "method"]),
              ("PALU ablations", [n for n, s in specs.items() if s.get("ablation")])]
    groups = [(t, ns) for t, ns in groups if ns]
    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 5.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    mu_t = res.get("target", {}).get("model_utility")
    for ax, (title, names) in zip(axes[0], groups):
        pts, labels_at = [], {}
        for i, n in enumerate(names):
            m = res.get(n, {})
            if m.get("forget_quality") is None or m.get("model_utility") is None:
                continue
            label = n if title == "methods" else ", ".join(specs[n]["ablation"])
            fq = max(m["forget_quality"], 1e-300)
            ax.scatter(m["model_utility"], fq, s=70, color=colors[i % len(colors)], zorder=3, label=label)
            labels_at.setdefault((round(m["model_utility"], 2), round(math.log10(fq))), []).append(
                (m["model_utility"], fq, label))
            pts.append((m["model_utility"], fq))
        for group in labels_at.values():  # coincident points (e.g. all at the KS floor) share one label
            ax.annotate(" / ".join(g[2] for g in group), group[0][:2], textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        t = res.get("target", {})
        if t.get("forget_quality") is not None and mu_t is not None:
            ax.scatter(mu_t, max(t["forget_quality"], 1e-300), marker="x", s=90, color="black", zorder=4,
                       label="target (before unlearning)")
            pts.append((mu_t, max(t["forget_quality"], 1e-300)))
        r = res.get("retain", {})
        if r.get("model_utility") is not None:
            ax.scatter(r["model_utility"], 1.0, marker="*", s=140, color="gold", edgecolor="black", zorder=4,
                       label="retain model (FQ = 1 by definition)")
            pts.append((r["model_utility"], 1.0))
        if mu_t is not None:
            ax.axvline(0.9 * mu_t, ls=":", color="gray", lw=1, label="0.9 x target utility")
        ax.axhline(0.05, ls="--", color="gray", lw=0.8, label="p = 0.05")
        ax.set_yscale("log")
        if pts:
            ax.set_ylim(min(min(p[1] for p in pts) / 10, 1e-3), 3.0)
        ax.set_xlabel("model utility (retain prob / ROUGE-L / truth ratio, harmonic mean)")
        ax.set_ylabel("forget quality (KS p-value vs retain model, log)")
        ax.set_title(f"mini-TOFU {title}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, loc="lower left")
    info = report["data"]
    fig.suptitle(f"authors {info['authors'][0]}:{info['authors'][1]}, forget {info['forget_pct']}%, "
                 f"seed {report['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------
class Stages:
    """Runs commands with their output in ``OUT/logs/<name>.log``, times them, and skips a stage whose command,
    input files (size + mtime of e.g. the model it starts from) and outputs are unchanged since a previous run
    (``--fresh`` redoes everything)."""

    def __init__(self, out: Path, fresh: bool):
        self.out, self.fresh = out, fresh
        self.seconds: dict[str, float] = {}
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def _fingerprint(inputs) -> dict:
        out = {}
        for p in inputs:
            p = Path(p)
            files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
            out[str(p)] = [[x.name, x.stat().st_size, x.stat().st_mtime_ns] for x in files if x.exists()]
        return out

    def run(self, name: str, cmd: list[str], done: Path | None = None, inputs=(), before=None,
            retries: int = 0) -> bool:
        stamp = self.logs / f"{name}.cmd.json"
        key = {"cmd": cmd, "inputs": self._fingerprint(inputs)}
        if not self.fresh and done is not None and done.exists() and stamp.exists() \
                and json.loads(stamp.read_text()) == key:
            print(f"[mini_tofu] {name}: reused ({done})", flush=True)
            return True
        if before is not None:
            before()
        log = self.logs / f"{name}.log"
        t = time.time()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
        self.seconds[name] = round(time.time() - t, 1)
        if rc != 0:
            stamp.unlink(missing_ok=True)
            tail = log.read_text().splitlines()[-15:]
            print(f"[mini_tofu] {name}: FAILED (exit {rc}) in {self.seconds[name]} s; log {log}:\n  "
                  + "\n  ".join(tail), flush=True)
            if retries > 0:
                shutil.copy(log, log.with_suffix(f".failed{retries}.log"))
                print(f"[mini_tofu] {name}: retrying ({retries} left)", flush=True)
                return self.run(name, cmd, done, inputs, before, retries - 1)
            return False
        stamp.write_text(json.dumps(key))
        print(f"[mini_tofu] {name}: {self.seconds[name]} s", flush=True)
        return True


def deepspeed_cmd(script: str, ds: str, config: str, overrides: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
            script, "--deepspeed", ds, "--config", config, *overrides]


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tofu", default=str(ROOT.parent / "shared" / "data" / "tofu"), help="folder of TOFU's jsonl")
    p.add_argument("--authors", default="0:40", help="A:B = authors A..B-1 (author i = rows 20i..20i+19)")
    p.add_argument("--forget", default="10%", help="forget fraction: the last authors of the range")
    p.add_argument("--seed", type=int, default=0, help="model init, data order, perturbed answers")
    p.add_argument("--out", help="output folder (default runs/mini_tofu/a<A>-<B>_f<PP>_s<seed>)")
    p.add_argument("--perturbed", choices=["borrow", "tofu"], default="borrow", help="see the module doc")
    p.add_argument("--pretrain", help="P:Q = pre-train the tiny model on the QA of authors P..Q-1 (outside the "
                                      "range) before the target / retain SFT: language competence in the domain")
    p.add_argument("--retain-eval-rows", type=int, default=RETAIN_EVAL_ROWS,
                   help="utility rows, spread evenly over the kept authors (0 = all)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all)")
    p.add_argument("--no-ablations", action="store_true", help="skip the PALU K / N ablations")
    p.add_argument("--lr", type=float, help="development only: one lr for every method instead of the family table; "
                                            "runs go to <method>_lr<LR> and the report to mini_tofu_lr<LR>.*")
    p.add_argument("--quick", action="store_true", help="a smoke run: few epochs, short generations")
    p.add_argument("--fresh", action="store_true", help="redo every stage even if its outputs exist")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the DeepSpeed checkpoints of every run")
    p.add_argument("--ds", default="ds_configs/cpu/zero2.json")
    p.add_argument("--port", type=int, default=29631)
    p.add_argument("--eval-ranks", type=int, default=2, help="evaluation processes (torchrun) per model")
    args = p.parse_args(argv)
    for k, v in CPU_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))

    t_start = time.time()
    tofu = Path(args.tofu)
    full = [json.loads(x) for x in (tofu / "full.jsonl").read_text().splitlines() if x.strip()]
    a, b = parse_authors(args.authors, len(full) // ROWS_PER_AUTHOR)
    pct = parse_forget(args.forget)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; valid: {', '.join(METHODS)}")
    pretrain = parse_authors(args.pretrain, len(full) // ROWS_PER_AUTHOR) if args.pretrain else None
    tag = f"_p{pretrain[0]}-{pretrain[1]}" if pretrain else ""
    out = Path(args.out or f"runs/mini_tofu/a{a}-{b}_f{pct:02d}_s{args.seed}{tag}{'_quick' if args.quick else ''}")
    out = out if out.is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(out, args.fresh)
    suffix = "" if args.lr is None else f"_lr{args.lr:g}"
    family_lr = FAMILY_LR if args.lr is None else {f: args.lr for f in FAMILY_LR}

    # 1. data
    t = time.time()
    pert_files = [[json.loads(x) for x in (tofu / f"{n}.jsonl").read_text().splitlines() if x.strip()]
                  for n in ("retain_perturbed", "forget01_perturbed", "forget05_perturbed", "forget10_perturbed")
                  if (tofu / f"{n}.jsonl").exists()]
    refusals = [json.loads(x)["answer"] for x in (tofu / "idontknow.jsonl").read_text().splitlines() if x.strip()]
    data = build_splits(full, tofu_perturbed_index(full, pert_files), refusals, a, b, pct, args.perturbed, args.seed,
                        args.retain_eval_rows or None, pretrain)
    write_jsonl(out / "data", data["files"])
    info = data["info"]
    forget_name, retain_name = info["forget_split"], info["retain_split"]
    print(f"[mini_tofu] authors {a}:{b}: forget {info['forget_authors']} ({info['rows'][forget_name]} rows), "
          f"retain {len(info['retain_authors'])} authors ({info['rows'][retain_name]} rows, "
          f"{info['rows']['retain_perturbed']} for utility); perturbed answers: {args.perturbed} (TOFU covers "
          f"{info['tofu_perturbed_rows_in_range']} of the range's {info['rows']['full']} rows)", flush=True)

    # 2. tokenizer + base model (in process: palu_ds.tiny), target and retain models
    base = out / "base"
    texts = tokenizer_texts(data["files"], forget_name)
    base_key = {"model": MODEL, "seed": args.seed, "texts": len(texts), "chars": sum(map(len, texts))}
    stamp = base / "mini_tofu_base.json"
    if args.fresh or not stamp.exists() or read_json(stamp) != base_key:
        from palu_ds.tiny import build_model_dir

        build_model_dir(str(base), texts, vocab_size=MODEL["vocab_size"], seed=args.seed, hidden=MODEL["hidden"],
                        layers=MODEL["layers"], heads=MODEL["heads"], intermediate=MODEL["intermediate"],
                        max_positions=MODEL["max_positions"])
        stamp.write_text(json.dumps(base_key))
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(base)))
    stages.seconds["data + tokenizer + base model"] = round(time.time() - t, 1)

    sft_epochs = QUICK["sft_epochs"] if args.quick else SFT["epochs"]
    if pretrain:  # language competence in the domain: the SFT recipe on the pre-training authors' QA, fewer epochs
        ok = stages.run("pretrain", deepspeed_cmd(
            "launch/finetune.py", args.ds, "launch/configs/mini_tofu/finetune.yaml",
            [f"model.path={base}", f"data.forget.source={out / 'data'}", "data.forget.config=pretrain",
             f"data.max_length={MAX_LENGTH}", f"train.lr={SFT['lr']}",
             f"train.epochs={QUICK['sft_epochs'] if args.quick else PRETRAIN_EPOCHS}",
             f"train.batch_size={SFT['batch_size']}", f"train.warmup_steps={SFT['warmup_steps']}",
             f"train.scheduler={SFT['scheduler']}", f"train.seed={args.seed}", "train.resume=never",
             "log.log_every=50", f"train.output_dir={out / 'pretrained'}"], args.port),
            done=out / "pretrained" / "model" / "config.json",
            inputs=[base / "model.safetensors", out / "data" / "pretrain.jsonl"])
        if not ok:
            print("[mini_tofu] cannot go on without the pre-trained model", file=sys.stderr)
            return 1
        _drop_checkpoints(out / "pretrained", args.keep_checkpoints)
        base = out / "pretrained" / "model"
    sft = [f"model.path={base}", f"data.forget.source={out / 'data'}", f"data.max_length={MAX_LENGTH}",
           f"train.lr={SFT['lr']}", f"train.epochs={sft_epochs}", f"train.batch_size={SFT['batch_size']}",
           f"train.warmup_steps={SFT['warmup_steps']}", f"train.scheduler={SFT['scheduler']}",
           f"train.weight_decay={SFT['weight_decay']}", f"train.max_grad_norm={SFT['max_grad_norm']}",
           f"train.seed={args.seed}", "train.resume=never", "log.log_every=50"]
    failed: dict[str, str] = {}
    for name, split in (("target", "full"), ("retain", retain_name)):
        ok = stages.run(f"finetune_{name}", deepspeed_cmd(
            "launch/finetune.py", args.ds, "launch/configs/mini_tofu/finetune.yaml",
            sft + [f"data.forget.config={split}", f"train.output_dir={out / name}"], args.port),
            done=out / name / "model" / "config.json",
            inputs=[base / "model.safetensors", out / "data" / f"{split}.jsonl"])
        if not ok:
            print(f"[mini_tofu] cannot go on without the {name} model", file=sys.stderr)
            return 1
        _drop_checkpoints(out / name, args.keep_checkpoints)
    sft_summary = {n: read_json(out / n / "summary.json") for n in ("target", "retain")}
    for n, s_ in sft_summary.items():
        if s_["last"]["loss/forget"] > MEMORIZED_NLL and not args.quick:
            print(f"[mini_tofu] warning: the {n} model's final answer NLL is {s_['last']['loss/forget']:.3f} "
                  f"(> {MEMORIZED_NLL}): it has not memorized its data", flush=True)

    # 3. unlearning: every method + the PALU ablations
    from palu_ds.methods import get_method

    specs = run_specs(vocab, methods, ablations=not args.no_ablations)
    epochs = QUICK["unlearn_epochs"] if args.quick else UNLEARN["epochs"]
    target_weights = out / "target" / "model" / "model.safetensors"
    precomputed: set[str] = set()
    for name, spec in specs.items():
        meth, run_dir = get_method(spec["method"]), out / (name + suffix)
        common = [f"model.path={out / 'target' / 'model'}", f"method.name={spec['method']}",
                  f"data.forget.source={out / 'data'}", f"data.forget.config={forget_name}",
                  f"data.max_length={MAX_LENGTH}", f"train.batch_size={UNLEARN['batch_size']}",
                  f"train.seed={args.seed}", "method.params={}"]
        common += [f"method.params.{k}={'null' if v is None else v}" for k, v in spec["params"].items()]
        common += ([f"data.retain.source={out / 'data'}", f"data.retain.config={retain_name}"] if meth.needs_retain
                   else ["data.retain=null"])
        if meth.needs_idk:
            common += [f"data.idk.source={out / 'data'}", "data.idk.config=idontknow"]
        # the methods' references: launch/precompute.py into a cache shared by the runs that need the same one;
        # the ablations': built by launch/train.py itself (same code path) in <run>/reference_cache
        ref = reference_dir(spec) if spec["group"] == "method" else None
        if ref is not None:
            common.append(f"reference.cache_dir={out / ref}")
        if ref is not None and ref not in precomputed:
            precomputed.add(ref)
            ok = stages.run(f"precompute_{Path(ref).name}", deepspeed_cmd(
                "launch/precompute.py", args.ds, "launch/configs/mini_tofu/unlearn.yaml", common, args.port),
                done=out / ref / "manifest.json", inputs=[target_weights],
                before=lambda: shutil.rmtree(out / ref, ignore_errors=True))  # a stale cache is an error otherwise
            if not ok:
                failed[name] = f"precompute failed (see logs/precompute_{Path(ref).name}.log)"
                continue
        train = [f"train.output_dir={run_dir}", f"train.lr={family_lr[spec['family']]}", f"train.epochs={epochs}",
                 f"train.scheduler={UNLEARN['scheduler']}", f"train.warmup_steps={UNLEARN['warmup_steps']}",
                 f"train.weight_decay={UNLEARN['weight_decay']}", f"train.max_grad_norm={UNLEARN['max_grad_norm']}",
                 "train.resume=never", "log.log_every=5"]
        ok = stages.run(f"unlearn_{name}{suffix}", deepspeed_cmd(
            "launch/train.py", args.ds, "launch/configs/mini_tofu/unlearn.yaml", common + train, args.port),
            done=run_dir / "model" / "config.json", inputs=[target_weights] + ([out / ref] if ref else []),
            before=lambda: shutil.rmtree(run_dir / "reference_cache", ignore_errors=True), retries=1)
        if not ok:
            failed[name] = f"training failed (see logs/unlearn_{name}{suffix}.log)"
        _drop_checkpoints(run_dir, args.keep_checkpoints)

    # 4. evaluation
    max_new = QUICK["max_new_tokens"] if args.quick else _max_answer_tokens(base, data["files"]["full"]) + 8
    models = {"retain": ("retain", out / "retain" / "model"), "target": ("target", out / "target" / "model")}
    models.update({n: (n + suffix, out / (n + suffix) / "model") for n in specs if n not in failed})
    results: dict[str, dict] = {}
    for name, (label, model) in models.items():
        cmd = [sys.executable, "evaluation/run.py"] if args.eval_ranks <= 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.eval_ranks),
             "--master_port", str(args.port + 1), "evaluation/run.py"]
        cmd += ["--model", str(model), "--suite", "tofu", "--split", forget_name, "--data", str(out / "data"),
                "--splits", "forget,retain", "--max-new-tokens", str(max_new), "--max-length", str(MAX_LENGTH),
                "--out", str(out / "eval" / label), "--name", label]
        cmd += ["--no-forget-quality"] if name == "retain" else ["--retain-results", str(out / "eval" / "retain")]
        ev_inputs = [model / "model.safetensors", out / "data" / f"{forget_name}_perturbed.jsonl",
                     out / "data" / "retain_perturbed.jsonl"]
        if name != "retain":
            ev_inputs.append(out / "eval" / "retain" / "results.json")
        # one retry: evaluation/run.py under torchrun sometimes aborts at exit ("terminate called without an active
        # exception", after writing its results); training runs get one too (a rank OOM-killed on a crowded machine)
        if not stages.run(f"eval_{label}", cmd, done=out / "eval" / label / "summary.json", inputs=ev_inputs,
                          retries=1):
            failed[name] = f"evaluation failed (see logs/eval_{label}.log)"
            if name == "retain":
                return 1
            continue
        results[name] = read_json(out / "eval" / label / "summary.json")["metrics"]
    add_relative(results)
    stages.run(f"report{suffix}", [sys.executable, "evaluation/report.py",
                                   *[str(out / "eval" / models[n][0]) for n in results],
                                   "--out", str(out / "eval" / f"report{suffix}.png")])

    # 5. table, JSON, PNG
    report = {
        "command": " ".join(["python", "benchmarks/mini_tofu.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed, "quick": args.quick, "data": info, "vocab_size": vocab,
        "settings": {"model": MODEL, "max_length": MAX_LENGTH, "sft": {**SFT, "epochs": sft_epochs},
                     "pretrain_epochs": PRETRAIN_EPOCHS if pretrain else None,
                     "unlearn": {**UNLEARN, "epochs": epochs}, "family_lr": family_lr, "family": FAMILY,
                     "palu_K": scaled_k(vocab), "eval_max_new_tokens": max_new, "ds_config": args.ds,
                     "retain_eval_rows": info["rows"]["retain_perturbed"]},
        "sft": {n: {"steps": s_["steps"], "first_nll": s_["first"]["loss/forget"],
                    "last_nll": s_["last"]["loss/forget"]} for n, s_ in sft_summary.items()},
        "specs": specs, "results": results, "failed": failed, "goal": goal_check(results),
        "stage_seconds": stages.seconds, "wall_seconds": round(time.time() - t_start, 1),
    }
    _drop_shm_buffers(args.port)
    stem = str(out / f"mini_tofu{suffix}")
    Path(stem + ".json").write_text(json.dumps(report, indent=1))
    md = render_markdown(report)
    Path(stem + ".md").write_text(md)
    render_png(report, stem + ".png")
    print("\n" + md)
    print(f"[mini_tofu] wrote {stem}.md, .json, .png ({report['wall_seconds'] / 60:.1f} min)")
    return 0 if not failed else 3


def _drop_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU shared-memory allreduce leaves ``/dev/shm/deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>``
    (66 MB a rank) behind after every launch (deepspeedai/DeepSpeed#4115); remove the ones of our own port."""
    for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{os.environ.get('MASTER_ADDR', '*')}_{port}_*"):
        f.unlink(missing_ok=True)


def _drop_checkpoints(run_dir: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _max_answer_tokens(model_dir: Path, rows: list[dict]) -> int:
    from transformers import AutoTokenizer

    from palu_ds.data.prompt import answer_ids

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return max(len(answer_ids(tok, r["answer"])) for r in rows)


if __name__ == "__main__":
    sys.exit(main())
