"""The precompute pass: the frozen reference runs once over the data (data-parallel, fixed order, eval mode, no
grad); every rank writes its own shard, rank 0 the manifest last (atomic rename), so a half-written cache is never
read."""

from __future__ import annotations

import glob
import logging
import os

import torch

from palu_ds import dist, lm_head, packing
from palu_ds.atomic import atomic_path, write_json
from palu_ds.progress import rows_progress

from .key import MANIFEST, CacheMismatch, _diff, cache_key, read_manifest
from palu_ds.methods import REFERENCE_PARTS, row_mask

from .parts import (_vocab_size, answer_nll_sums, id_dtype, offsets_name, reference_capture, reference_forward,
                    reference_tensors, row_masks, topk_sizes)

log = logging.getLogger("palu_ds")


def rank_batches(ds, batch_size: int, pad_id: int, device):
    """This rank's share of ``ds`` (examples rank, rank + world, ...) in fixed order, as ``(batch, real)``: every rank
    yields the same number of batches (a rank that runs out repeats example 0 with ``real=False``), because the
    forwards of a ZeRO-3 model are collective."""
    from palu_ds.data.collate import collate

    mine = list(range(dist.rank(), len(ds), dist.world()))
    n_batches = int(dist.all_reduce_max(torch.tensor(-(-len(mine) // batch_size))))
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size]
        batch = collate([ds[i] for i in (chunk or [0])], pad_id)
        yield {k: v.to(device) for k, v in batch.items()}, bool(chunk)


def _cache_names(method, want, datasets) -> list[str]:
    names = [n for n in datasets if method.reference_parts_for(n)]
    if "retain_loss" in want and method.constraint in datasets:
        names.append(method.constraint)
    return sorted(set(names))


def precompute(cfg, method, hp, datasets, tokenizer, ds_config, cache_dir: str, model=None) -> dict:
    """Write (or reuse) the cache for this run; return its manifest. Every rank calls this."""
    key = dist.broadcast_object(cache_key(cfg, method, hp, datasets, tokenizer) if dist.is_main() else None)
    manifest_path = os.path.join(cache_dir, MANIFEST)
    if os.path.isfile(manifest_path):
        manifest = read_manifest(manifest_path)
        differ = _diff(manifest["key"], key)
        if differ:
            raise CacheMismatch(
                f"{cache_dir}: the reference cache was made for another run; differing field(s): "
                + ", ".join(f"{d} (cache {manifest['key'].get(d)!r}, run {key.get(d)!r})" for d in differ)
                + ". Point reference.cache_dir elsewhere or delete that directory to recompute.")
        log.info("reference cache %s matches this run: reused", cache_dir)
        return manifest
    dist.barrier()
    if dist.is_main():  # an incomplete cache (no manifest): never read, recomputed
        os.makedirs(cache_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(cache_dir, "*.safetensors*")):
            os.remove(stale)
    dist.barrier()
    model = model if model is not None else load_reference_model(cfg, ds_config)
    V = _vocab_size(model)
    K, k = topk_sizes(hp, V, cfg.method.params, cfg.reference.model)  # cfg resolved: reference.model is set
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    want = method.needed_parts(hp)
    retain_sums = torch.zeros(2, dtype=torch.float64)
    masks = row_masks(REFERENCE_PARTS)  # every shard records each example's rows under every row mask
    capture = reference_capture(model, method, hp)
    packed = packing.start(model, cfg.train.padding_free)  # rows end to end, as the training forward
    answer_only = lm_head.start_answer_only(model, cfg.train.answer_only_logits)  # logits at answer positions only
    for name in _cache_names(method, want, datasets):
        ds, parts = datasets[name], method.reference_parts_for(name)
        store: dict[str, list] = {}
        ids, counts = [], {r: [] for r in masks}
        progress = rows_progress(len(range(dist.rank(), len(ds), dist.world())), f"reference {name}")
        for batch, real in rank_batches(ds, cfg.train.batch_size, tokenizer.pad_token_id, device):
            logits, hidden = reference_forward(model, batch, capture, packed, answer_only)
            if not real:
                continue
            progress.update(len(batch["input_ids"]))
            if name == method.constraint and "retain_loss" in want:
                retain_sums += answer_nll_sums(logits, batch).cpu()
            if not parts:
                continue
            ids += batch["example_id"].tolist()
            for r in masks:
                counts[r] += row_mask(batch, r).sum(-1).tolist()
            for t, v in reference_tensors(logits, batch, parts, K, k, hidden).items():
                store.setdefault(t, []).append(v.cpu())
        progress.close()
        if parts:
            _write_shard(cache_dir, name, dist.rank(), ids, counts, store, V, getattr(torch, cfg.reference.dtype))
    if capture is not None:
        capture.remove()
    retain_sums = dist.all_reduce_sum(retain_sums)
    dist.barrier()
    manifest = {"key": key, "world_size": dist.world(), "K": K, "k": k, "vocab_size": V,
                "shards": sorted(os.path.basename(p) for p in glob.glob(os.path.join(cache_dir, "*.safetensors")))}
    if "retain_loss" in want:
        manifest["retain_loss"] = float(retain_sums[0] / retain_sums[1].clamp_min(1))
    if dist.is_main():
        from palu_ds.integrity import file_digest

        manifest["shard_bytes"] = {s: os.path.getsize(os.path.join(cache_dir, s)) for s in manifest["shards"]}
        manifest["shard_sha256"] = {s: file_digest(os.path.join(cache_dir, s)) for s in manifest["shards"]}
        write_json(manifest_path, manifest)
    return dist.broadcast_object(manifest if dist.is_main() else None)  # every rank checks sizes and checksums


def _write_shard(cache_dir, name, rank, ids, counts, store, V, dtype) -> None:
    """One rank's shard of one split, written to a temporary name and renamed (never half-written): the example ids,
    each row mask's per-example row offsets, and every stored tensor in its kind's dtype (REFERENCE_PARTS)."""
    from safetensors.torch import save_file

    kinds = {t: kind for part in REFERENCE_PARTS.values() for t, kind in part.tensors.items()}
    cast = {"ids": id_dtype(V), "values": dtype, "float32": torch.float32}
    tensors = {"example_ids": torch.tensor(ids, dtype=torch.int64)}
    tensors.update({offsets_name(r): torch.tensor([0] + c, dtype=torch.int64).cumsum(0) for r, c in counts.items()})
    tensors.update({t: torch.cat(v).to(cast[kinds[t]]) for t, v in store.items()})
    with atomic_path(os.path.join(cache_dir, f"{name}.rank{rank}.safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)


def load_reference_model(cfg, ds_config):
    """The frozen reference: eval mode, no grad; a DeepSpeed ZeRO-3 inference engine when training uses ZeRO-3."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from palu_ds.ds_config import zero_stage

    path = cfg.reference.model  # resolved (palu_ds.config.resolve): model.path unless set
    dtype = torch.float32  # as the trained model: bf16 is autocast over fp32 weights (palu_ds.ds_config)
    if zero_stage(ds_config) == 3:
        inf_cfg = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
        inf_cfg["zero_optimization"] = {k: v for k, v in ds_config["zero_optimization"].items()
                                        if not k.startswith("offload_optimizer")}
        keep = HfDeepSpeedConfig(inf_cfg)  # noqa: F841 - zero.Init while loading
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
        model.eval().requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=inf_cfg)
        engine.module.eval()
        return engine
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code)
    device = deepspeed.get_accelerator().current_device_name()
    return model.to(device).eval().requires_grad_(False)
