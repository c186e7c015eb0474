"""The model card (``README.md``) written into every saved model folder: what was done to the model.

A Hugging Face model card (huggingface_hub's :class:`~huggingface_hub.ModelCard` / ``ModelCardData``: the YAML
metadata block with ``base_model``, ``library_name``, ``tags`` -- ``unlearning`` or ``fine-tuning`` and the method --
and ``datasets``), then the method and every hyper-parameter, each data source with its size and content hash, the
span source and counts, the steps, world size and training settings, the final losses and lambda, the palu_ds version
and git commit, and the last evaluation's headline numbers when one ran.

The card is written after the model is in place; a card that cannot be written is a warning (the model is kept).
"""

from __future__ import annotations

import logging
import os
import subprocess

from palu_ds import __version__

log = logging.getLogger("palu_ds")

CARD = "README.md"


def git_commit(path: str | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package), ``+dirty`` when it has uncommitted
    changes to tracked files; None outside a checkout or without git."""
    where = path or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def base_model_id(path: str) -> str | None:
    """A hub name as it is; a local folder: the ``base_model`` of its own card (a fine-tuned target names its base),
    else None (the folder's path is in the card's text)."""
    if not os.path.isdir(path):
        return path or None
    card = os.path.join(path, CARD)
    if os.path.isfile(card):
        try:
            from huggingface_hub import ModelCard

            base = ModelCard.load(card).data.base_model
            return base if isinstance(base, str) else None
        except Exception:  # noqa: BLE001 - a card we cannot parse is not ours to judge
            return None
    return None


def _hub_dataset(source: str) -> str | None:
    """A data source that names a hub dataset (``org/name``, not a local file or folder)."""
    return source if source and not os.path.exists(source) and source.count("/") == 1 else None


def _num(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _table(rows: list[tuple], head: tuple) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_num(c) if c is not None else "-" for c in r) + " |" for r in rows]
    return "\n".join(lines)


def headline(metrics: dict) -> dict:
    """The numbers a card shows of an evaluation summary: its top-level scalars (``model_utility``,
    ``forget_quality``, ...), or every scalar when all are per part (``forget/prob``)."""
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    top = {k: v for k, v in scalars.items() if "/" not in k}
    return top or scalars


def run_info(run, datasets: dict, *, steps: int, world_size: int, skipped_steps: int, final: dict,
             spans: dict | None = None, evaluation: dict | None = None) -> dict:
    """What a card says about a run (:class:`palu_ds.config.Run`): its config, method and hyper-parameters, each
    batch's data source with its rows and content hash (the reference cache's
    :func:`~palu_ds.reference.key.dataset_fingerprint`), the counters and last scalars of training, the span report
    and the last evaluation (``{"step": N, "metrics": {...}}``), the package version and commit."""
    import dataclasses

    from palu_ds.reference.key import dataset_fingerprint

    cfg = dataclasses.asdict(run.cfg)
    data = {name: {**{k: cfg["data"][name][k] for k in ("source", "config", "split")}, "rows": len(ds),
                   "sha256": dataset_fingerprint(ds)} for name, ds in datasets.items()}
    name = run.cfg.log.run_name or os.path.basename(os.path.normpath(run.cfg.train.output_dir))
    return {"name": name, "method": run.method.name, "method_doc": run.method.doc, "unlearning": run.method.unlearning,
            "uses_reference": bool(run.reference_parts),
            "config": cfg, "hp": dict(run.hp), "base_model": base_model_id(run.cfg.model.path), "data": data,
            "spans": spans, "steps": steps, "world_size": world_size, "skipped_steps": skipped_steps,
            "final": dict(final or {}), "eval": evaluation, "version": __version__, "commit": git_commit()}


def render(info: dict):
    """The :class:`huggingface_hub.ModelCard` of a run described by ``info`` (:func:`run_info`)."""
    from huggingface_hub import ModelCard, ModelCardData

    method, cfg = info["method"], info["config"]
    kind = "unlearning" if info["unlearning"] else "fine-tuning"
    data = ModelCardData(base_model=info["base_model"], library_name="transformers",
                         tags=["palu_ds", kind, method],
                         datasets=sorted({d for d in (_hub_dataset(s["source"]) for s in info["data"].values()) if d})
                         or None)
    train = cfg["train"]
    parts = [f"# {info['name']}",
             f"{'Unlearned' if info['unlearning'] else 'Fine-tuned'} with palu_ds {info['version']}"
             + (f" (commit `{info['commit']}`)" if info["commit"] else "")
             + f" from `{cfg['model']['path']}` by **{method}**" + (f": {info['method_doc']}." if info["method_doc"]
                                                                    else "."),
             "## Method and hyper-parameters",
             _table(sorted(info["hp"].items()), ("parameter", "value")),
             "## Data",
             _table([(name, s["source"], s.get("config"), s.get("split"), s["rows"], s["sha256"])
                     for name, s in info["data"].items()], ("batch", "source", "config", "split", "rows", "sha256/16")),
             ]
    spans = info.get("spans")
    if spans:
        parts.append(f"Sensitive spans: source **{spans.get('source')}**; "
                     + ", ".join(f"{k} {v}" for k, v in spans.items() if isinstance(v, (int, float))
                                 and not isinstance(v, bool)) + ".")
    parts += ["## Training",
              _table([("steps", info["steps"]), ("world size", info["world_size"]),
                      ("skipped (non-finite) steps", info["skipped_steps"]), ("lr", train["lr"]),
                      ("scheduler", train["scheduler"]), ("batch size per rank", train["batch_size"]),
                      ("gradient accumulation", train["grad_accum"]), ("seed", train["seed"]),
                      ("reference", cfg["reference"]["mode"] if info["uses_reference"] else "none (reference-free)")],
                     ("setting", "value")),
              "## Final values",
              _table(sorted((k, v) for k, v in info["final"].items() if k.startswith(("loss/", "dual/"))),
                     ("value", "last step"))]
    if info.get("eval"):
        ev = info["eval"]
        parts += ["## Evaluation", f"{cfg['eval']['suite']} ({cfg['eval']['split']}) at step {ev['step']}:",
                  _table(sorted(headline(ev["metrics"]).items()), ("metric", "value"))]
    parts.append("Load with `transformers.AutoModelForCausalLM.from_pretrained(<this folder>)`.")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(parts) + "\n")


def write_card(model_dir: str, info: dict) -> str | None:
    """Write ``<model_dir>/README.md`` atomically; returns its path, or None (with a warning naming the folder and
    the reason) when it cannot be written -- the model itself is never touched."""
    from palu_ds.atomic import write_text

    path = os.path.join(model_dir, CARD)
    try:
        text = str(render(info))
        write_text(path, text)
    except OSError as e:
        if os.path.isfile(path + ".tmp"):  # what the failed write left (the folder may still take a removal)
            try:
                os.remove(path + ".tmp")
            except OSError:
                pass
        log.warning("model card not written to %s (%s); the model is saved without it", path, e)
        return None
    return path
