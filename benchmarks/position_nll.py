"""Teacher-forced answer NLL by position kind -- I_init, the rest of each sensitive span, common -- for saved models.

Labels the data exactly as training does (palu_ds.data.QADataset: detected or labelled spans, first N tokens of each
span = I_init, tokens outside every span = common, EOS included) and reports, per model, the mean NLL (nats/token)
of each kind. Shows *where* a method forgets: PALU targets I_init and keeps common tokens by design.

    python benchmarks/position_nll.py --data runs/mini_tofu/a0-40_f10_s0/data --config forget10 \\
        target=runs/mini_tofu/a0-40_f10_s0/target/model palu=runs/mini_tofu/a0-40_f10_s0/palu/model ...
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from palu_ds.batch import shift
from palu_ds.data import QADataset, collate
from palu_ds.data.qa import QAOptions

KINDS = ("I_init", "rest of span", "common")


def kind_masks(batch: dict) -> dict[str, torch.Tensor]:
    """Masks over target tokens (aligned with shifted logits) of each position kind."""
    _, labels = shift(torch.zeros(batch["labels"].shape + (1,)), batch["labels"])
    answer = labels != -100
    init = batch["sens_mask"][:, 1:].bool() & answer
    common = batch["common_mask"][:, 1:].bool() & answer
    return {"I_init": init, "rest of span": answer & ~init & ~common, "common": common}


@torch.no_grad()
def position_nll(model_dir: str, dataset: QADataset, batch_size: int = 16) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sums = {k: 0.0 for k in KINDS}
    counts = {k: 0 for k in KINDS}
    pad = getattr(model.config, "pad_token_id", None) or 0
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lg, lb = shift(logits, batch["labels"])
        nll = torch.nn.functional.cross_entropy(lg.transpose(1, 2), lb.clamp_min(0), reduction="none")
        for k, m in kind_masks(batch).items():
            sums[k] += float(nll[m].sum())
            counts[k] += int(m.sum())
    return {k: sums[k] / max(1, counts[k]) for k in KINDS} | {f"n_{k}": counts[k] for k in KINDS}


def nll_table(rows: dict[str, dict]) -> str:
    """The markdown table of :func:`position_nll`'s numbers, one row per model."""
    return "\n".join(["| model | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
                     + [f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in KINDS) + " |" for name, r in rows.items()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a data folder (TOFU layout) or a .json/.jsonl file")
    p.add_argument("--config", default=None, help="the split inside --data, e.g. forget10")
    p.add_argument("--n-init", type=int, default=3, help="N: the first N tokens of each span form I_init")
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    p.add_argument("models", nargs="+", help="name=model_dir (the first model's tokenizer labels the data)")
    a = p.parse_args(argv)
    pairs = [m.rsplit("=", 1) for m in a.models]  # a name may hold "=" (e.g. "palu N=1"), a path not
    if any(len(x) != 2 for x in pairs):
        p.error("models are given as name=model_dir")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pairs[0][1])
    ds = QADataset.from_source(a.data, tok, QAOptions(max_length=a.max_length, n_init=a.n_init), config=a.config)
    rows = {name: position_nll(path, ds) for name, path in pairs}
    first = next(iter(rows.values()))
    print(f"answer NLL (nats/token) by position kind, {len(ds)} examples; tokens: "
          + ", ".join(f"{k} {first['n_' + k]}" for k in KINDS))
    print(nll_table(rows))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
