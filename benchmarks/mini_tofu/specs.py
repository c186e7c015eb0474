"""The runs of stage 3: each method (PALU's K scaled to the vocabulary) and the PALU K / N ablations, and which of
them share a reference cache."""

from __future__ import annotations

from .settings import ABLATION_K, ABLATION_N, FAMILY, METHODS, PAPER_K, PAPER_VOCAB


def scaled_k(vocab: int) -> int:
    return max(1, min(vocab, round(PAPER_K * vocab / PAPER_VOCAB)))


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
