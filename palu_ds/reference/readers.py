"""Readers used by the training loop: each batch's reference tensors from the cache (:class:`CachedReference`), a
live reference model (:class:`ResidentReference`, for comparison) or nothing (:class:`NoReference`), and
:func:`build_reference`, which picks one for a run."""

from __future__ import annotations

import os

import torch

from palu_ds import dist, lm_head, packing

from .compute import load_reference_model, precompute, rank_batches
from .key import MANIFEST, read_manifest
from palu_ds.methods import REFERENCE_PARTS

from .parts import (_vocab_size, answer_nll_sums, offsets_name, reference_capture, reference_forward, reference_tensors,
                    topk_sizes)


class NoReference:
    """Reference-free methods: nothing to look up."""

    def lookup(self, name: str, batch: dict) -> dict:
        return {}

    def retain_loss(self) -> float:
        raise ValueError("dual.epsilon_rel needs the reference retain loss, but the method has no reference: "
                         "give dual.epsilon (absolute) instead")


class CachedReference:
    """Reader of a complete cache; ``lookup`` packs the rows of a batch by example id. Each shard's size and sha256
    are checked against the manifest when it is opened (once per run): a corrupt shard is an error naming it."""

    def __init__(self, cache_dir: str, manifest: dict | None = None):
        from safetensors import safe_open

        from palu_ds.integrity import file_digest

        path = os.path.join(cache_dir, MANIFEST)
        if manifest is None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{cache_dir} has no {MANIFEST}: the cache is incomplete; run "
                                        "launch/precompute.py with the same config (or train, which runs it)")
            manifest = read_manifest(path)
        self.manifest = manifest
        self.index: dict[str, dict[int, tuple]] = {}
        self.shards = {}
        for shard in manifest["shards"]:
            fp = os.path.join(cache_dir, shard)
            want = manifest.get("shard_bytes", {}).get(shard)
            digest = manifest.get("shard_sha256", {}).get(shard)
            try:
                if want is not None and os.path.getsize(fp) != want:
                    raise ValueError(f"size {os.path.getsize(fp)} != {want} recorded in the manifest")
                if digest is None:
                    raise ValueError("the manifest records no checksum for it (a cache of an older palu_ds)")
                if file_digest(fp) != digest:
                    raise ValueError(f"its content differs from the checksum recorded in the manifest ({digest})")
                f = safe_open(fp, framework="pt")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            except Exception as e:  # noqa: BLE001 - any unreadable shard is named
                raise RuntimeError(f"reference cache shard {fp} is corrupt ({e}); delete {cache_dir} and rerun "
                                   "launch/precompute.py (or train, which recomputes it)") from e
            name = shard.split(".rank")[0]
            self.shards[shard] = tensors
            idx = self.index.setdefault(name, {})
            for j, ex in enumerate(tensors["example_ids"].tolist()):
                idx[ex] = (shard, j)

    def lookup(self, name: str, batch: dict) -> dict:
        if name not in self.index:
            return {}
        got: dict[str, list] = {}
        for ex in batch["example_id"].tolist():
            try:
                shard, j = self.index[name][ex]
            except KeyError:
                raise KeyError(f"example {ex} of the {name} set is not in the reference cache: the data changed "
                               "since the precompute; delete the cache to recompute") from None
            t = self.shards[shard]
            for part in REFERENCE_PARTS.values():  # a row part: the example's rows; a sequence part: its one value
                for key in (k for k in part.tensors if k in t):
                    if part.rows is None:
                        got.setdefault(key, []).append(t[key][j:j + 1])
                    else:
                        off = t[offsets_name(part.rows)]
                        got.setdefault(key, []).append(t[key][off[j]:off[j + 1]])
        dev = batch["input_ids"].device
        return {k: torch.cat(v).to(dev).long() if k.endswith("ids") else torch.cat(v).to(dev).float()
                for k, v in got.items()}

    def retain_loss(self) -> float:
        if "retain_loss" not in self.manifest:
            raise ValueError("the reference cache holds no retain loss; the method needs 'retain_loss'")
        return self.manifest["retain_loss"]


class ResidentReference:
    """The reference kept live (for comparison): computes the same packed tensors per batch on the fly."""

    def __init__(self, model, method, hp, datasets, tokenizer, batch_size: int, given: dict | None = None,
                 packed: bool = False, answer_only: bool = False):
        self.model, self.method, self.packed, self.answer_only = model, method, packed, answer_only
        self.capture = reference_capture(model, method, hp)
        V = _vocab_size(model)
        self.K, self.k = topk_sizes(hp, V, given)
        self._retain = None
        self.datasets, self.tokenizer, self.batch_size = datasets, tokenizer, batch_size

    def lookup(self, name: str, batch: dict) -> dict:
        parts = self.method.reference_parts_for(name)
        if not parts:
            return {}
        logits, hidden = reference_forward(self.model, batch, self.capture, self.packed, self.answer_only)
        return {k: v.float() if v.is_floating_point() else v for k, v in
                reference_tensors(logits, batch, parts, self.K, self.k, hidden).items()}

    def retain_loss(self) -> float:
        if self._retain is None:
            sums = torch.zeros(2, dtype=torch.float64)
            device = next(self.model.parameters()).device
            retain = self.datasets[self.method.constraint]
            for batch, real in rank_batches(retain, self.batch_size, self.tokenizer.pad_token_id, device):
                logits, _ = reference_forward(self.model, batch, None, self.packed, self.answer_only)
                if real:
                    sums += answer_nll_sums(logits, batch).cpu()
            sums = dist.all_reduce_sum(sums)
            self._retain = float(sums[0] / sums[1].clamp_min(1))
        return self._retain


def build_reference(cfg, method, hp, datasets, tokenizer, ds_config):
    """The reference provider the training loop asks for each batch's tensors."""
    if not method.needed_parts(hp) or cfg.reference.mode == "none":
        return NoReference()
    if cfg.reference.mode == "resident":
        model = load_reference_model(cfg, ds_config)
        return ResidentReference(model, method, hp, datasets, tokenizer, cfg.train.batch_size, cfg.method.params,
                                 packing.start(model, cfg.train.padding_free),
                                 lm_head.start_answer_only(model, cfg.train.answer_only_logits))
    cache_dir = cfg.reference.cache_dir  # resolved (palu_ds.config.resolve): <output_dir>/reference_cache by default
    manifest = precompute(cfg, method, hp, datasets, tokenizer, ds_config, cache_dir)
    import gc

    gc.collect()  # the reference model of the precompute pass is gone before the policy loads
    return CachedReference(cache_dir, manifest)
