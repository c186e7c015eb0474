"""Batched model passes: teacher-forced token statistics of targets given prompts, and left-padded greedy generation.

Both take token ids (see :mod:`palu_ds.data.prompt`) and return per-query results in the order given.  Queries are
sorted by length inside a call to keep padding small.  Under DeepSpeed ZeRO-3 (parameters partitioned across
ranks) every rank must run the same number of forward passes, so with ``lockstep`` the number of batches is
synchronised across ranks (extra dummy batches) and generation uses ``synced_gpus``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from palu_ds.data.collate import pad_ids
from palu_ds.dist import max_across_ranks, world
from palu_ds.lm_head import accepts_logits_to_keep
from palu_ds.progress import rows_progress


@dataclass
class TokenStats:
    """Per-target-token statistics of one query (length T = number of target tokens)."""

    logps: np.ndarray  # [T] log p(y_t | x, y_<t)
    greedy_match: np.ndarray  # [T] argmax_v p(v | x, y_<t) == y_t
    mu: Optional[np.ndarray] = None  # [T] E_v[log p(v)] (Min-K%++), when vocab_stats
    var: Optional[np.ndarray] = None  # [T] Var_v[log p(v)], when vocab_stats


def unwrap(model):
    """The Hugging Face model inside a DeepSpeed engine / DDP wrapper (or the model itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def model_device(model) -> torch.device:
    return next(unwrap(model).parameters()).device


def is_zero3(model) -> bool:
    """True when parameters are ZeRO-3 partitioned (every rank must then join every forward pass)."""
    return any(hasattr(p, "ds_status") for p in unwrap(model).parameters())


def default_lockstep(model) -> bool:
    return world() > 1 and is_zero3(model)


def pad_id_of(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    return 0


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def score_targets(
    model,
    queries: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int = 16,
    vocab_stats: bool = False,
    lockstep: Optional[bool] = None,
    chunk: int = 256,
    desc: str = "scoring",
) -> list[TokenStats]:
    """Teacher-forced statistics of each ``(prompt_ids, target_ids)`` query (right padding; the logit at position
    ``t`` scores token ``t + 1``).  ``vocab_stats`` adds the mean/variance of ``log p`` under the next-token
    distribution (Min-K%++).  A model that takes ``logits_to_keep`` forms logits from the batch's first scored
    position on only: no [batch, prompt, vocab] logits for the prompts' common start (memory; on TOFU with SmolLM2
    the evaluation time did not measurably change); the values are the model's own logits either way."""
    hf = unwrap(model)
    device = model_device(model)
    keep = accepts_logits_to_keep(hf)
    lockstep = default_lockstep(model) if lockstep is None else lockstep
    lengths = [len(p) + len(t) for p, t in queries]
    for i, (p, t) in enumerate(queries):
        if len(p) == 0 or len(t) == 0:
            raise ValueError(f"score_targets: query {i} has an empty prompt ({len(p)}) or target ({len(t)}); "
                             "a target token needs at least one token before it (BOS)")
    batches = _batches(lengths, batch_size)
    n_batches = max_across_ranks(len(batches), device) if lockstep else len(batches)
    out: list[Optional[TokenStats]] = [None] * len(queries)
    progress = rows_progress(len(queries), desc)  # this rank's queries, done / total and ETA on rank 0
    for b in range(n_batches):
        idx = batches[b] if b < len(batches) else []
        seqs = [list(queries[i][0]) + list(queries[i][1]) for i in idx] or [[pad_id]]  # dummy keeps ranks in step
        ids, mask = pad_ids(seqs, pad_id)
        width = ids.shape[1]
        first = min((len(queries[i][0]) - 1 for i in idx), default=0)  # the batch's first scored position
        extra = {"logits_to_keep": width - first} if keep and idx else {}
        logits = hf(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits
        offset = first if extra else 0  # logits[:, 0] is position ``offset``
        for j, i in enumerate(idx):
            prompt, target = queries[i]
            start, n = len(prompt) - 1 - offset, len(target)
            tgt = torch.tensor(list(target), dtype=torch.long, device=logits.device)
            parts: dict[str, list] = {"lp": [], "match": [], "mu": [], "var": []}
            for c in range(0, n, chunk):
                lsm = torch.log_softmax(logits[j, start + c: start + min(n, c + chunk)].float(), dim=-1)
                t = tgt[c: c + chunk]
                parts["lp"].append(lsm.gather(-1, t[:, None])[:, 0])
                parts["match"].append(lsm.argmax(-1) == t)
                if vocab_stats:
                    p = lsm.exp()
                    plogp = torch.where(p > 0, p * lsm, torch.zeros_like(lsm))
                    mu = plogp.sum(-1)
                    parts["mu"].append(mu)
                    parts["var"].append((torch.where(p > 0, plogp * lsm, torch.zeros_like(lsm))).sum(-1) - mu * mu)
            cat = {k: torch.cat(v).cpu().numpy() for k, v in parts.items() if v}
            out[i] = TokenStats(cat["lp"].astype(np.float64), cat["match"].astype(bool),
                                cat.get("mu"), cat.get("var"))
        del logits
        progress.update(len(idx))
    progress.close()
    return out  # type: ignore[return-value]


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    lockstep: Optional[bool] = None,
    desc: str = "generation",
) -> list[str]:
    """Greedy continuations of each prompt (token ids), decoded without special tokens, cut at the first EOS (the
    tokenizer's or any of the checkpoint generation config's).
    Batches are left-padded with an attention mask, so a padded row generates what it would alone."""
    from transformers import GenerationConfig

    hf = unwrap(model)
    device = model_device(model)
    lockstep = default_lockstep(model) if lockstep is None else lockstep
    pad_id = pad_id_of(tokenizer)
    model_eos = getattr(hf.generation_config, "eos_token_id", None)  # e.g. Llama-3: end_of_text and eot
    model_eos = list(model_eos) if isinstance(model_eos, (list, tuple)) else [model_eos]
    eos_set = set(model_eos + [tokenizer.eos_token_id]) - {None}
    gen_cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                               eos_token_id=sorted(eos_set) or None, bos_token_id=tokenizer.bos_token_id)
    batches = _batches([len(p) for p in prompts], batch_size)
    n_batches = max_across_ranks(len(batches), device) if lockstep else len(batches)
    texts: list[Optional[str]] = [None] * len(prompts)
    saved_cfg = hf.generation_config
    hf.generation_config = gen_cfg  # a clean config: no sampling / penalties inherited from the checkpoint
    progress = rows_progress(len(prompts), desc)
    try:
        for b in range(n_batches):
            idx = batches[b] if b < len(batches) else []
            seqs = [list(prompts[i]) for i in idx] or [[pad_id]]
            empty = [i for i, s in zip(idx, seqs) if not s]
            if empty:
                raise ValueError(f"generate_greedy: prompt {empty[0]} is empty")
            ids, mask = pad_ids(seqs, pad_id, left=True)
            width = ids.shape[1]
            gen = hf.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg,
                              synced_gpus=lockstep)
            for j, i in enumerate(idx):
                new = gen[j, width:].tolist()
                for k, tok in enumerate(new):
                    if tok in eos_set:
                        new = new[:k]
                        break
                texts[i] = tokenizer.decode(new, skip_special_tokens=True)
            progress.update(len(idx))
    finally:
        hf.generation_config = saved_cfg
        progress.close()
    return texts  # type: ignore[return-value]
