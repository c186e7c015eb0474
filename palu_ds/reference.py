"""Reference-model tensors for a batch: a precomputed cache (default), a resident model, or none.

The precompute pass runs the frozen reference once over the data (data-parallel, fixed order, eval mode, no grad)
and writes exactly what the method needs (``Method.reference_parts``), per example:

* ``topk_ids``  the reference's top-K ids at the I_init positions (PALU), int16/int32
* ``kl``        the reference's top-k ids and log-probs at the common positions (sparse KL), values fp16/bf16
* ``seq_logps`` the reference's summed answer log-prob per sequence (NPO, IdkDPO), fp32
* ``retain_loss`` the reference's mean answer NLL on the retain set (ε = (1 + a)·L_retain(ref)), in the manifest

Layout of a cache dir: ``<name>.rank<r>.safetensors`` (one shard per data set and rank, holding the example ids and
row offsets next to the rows), and ``manifest.json`` written last by rank 0 through an atomic rename. The manifest
holds the cache key; a cache without manifest is incomplete and never read; a manifest whose key differs from the
run's is refused, naming the field. Training reads the shards memory-mapped and packs rows per batch by example id,
so any shuffle and any training world size work.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os

import torch

from palu_ds import __version__, dist
from palu_ds.batch import IGNORE_INDEX, shift

log = logging.getLogger("palu_ds")
MANIFEST = "manifest.json"
ROW_PARTS = {"topk_ids": ("topk_ids",), "kl": ("kl_ids", "kl_logps")}
CACHE_FORMAT = 2  # 2: the manifest records each shard's sha256 (``shard_sha256``), checked when the shard is opened


class CacheMismatch(RuntimeError):
    pass


# ---------------------------------------------------------------------- what the reference contributes
# Which parts each batch needs is declared by the method (palu_ds.methods.Method.reference / needed_parts).


def reference_tensors(logits: torch.Tensor, batch: dict, parts: tuple[str, ...], K: int, k: int) -> dict:
    """Packed reference tensors (palu_ds.batch's order) from reference logits [B, T, V]."""
    lg, labels, sens, common = shift(logits, batch["labels"], batch["sens_mask"], batch["common_mask"])
    out = {}
    if "topk_ids" in parts:
        out["topk_ids"] = lg[sens].topk(min(K, lg.shape[-1]), dim=-1).indices
    if "kl" in parts:
        logps = torch.log_softmax(lg[common].float(), dim=-1)
        top = logps.topk(min(k, lg.shape[-1]), dim=-1)
        out["kl_ids"], out["kl_logps"] = top.indices, top.values
    if "seq_logps" in parts:
        mask = labels != IGNORE_INDEX
        tok = torch.log_softmax(lg.float(), -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        out["seq_logps"] = (tok * mask).sum(-1)
    return out


def answer_nll_sums(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """[sum of answer-token NLL, number of answer tokens] of a batch (for the reference retain loss)."""
    lg, labels = shift(logits, batch["labels"])
    nll = torch.nn.functional.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), labels.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum")
    return torch.stack([nll.double(), (labels != IGNORE_INDEX).sum().double()])


def _vocab_size(model) -> int:
    """Vocabulary size of an HF model or of a DeepSpeed engine wrapping one (whose ``.config`` is DeepSpeed's)."""
    return getattr(model, "module", model).config.vocab_size


def topk_sizes(hp, vocab_size: int, given: dict | None = None, model: str = "the reference model") -> tuple[int, int]:
    """(K, kl_topk) for a model of ``vocab_size`` tokens. A value the config sets above the vocabulary is an error
    (palu_ds.config.check_vocabulary); a method's paper default above it (PALU's K=5000 on a small vocabulary)
    becomes the whole vocabulary, logged."""
    from palu_ds.config import check_vocabulary

    check_vocabulary(given or {}, vocab_size, model)
    out = []
    for key in ("K", "kl_topk"):
        v = hp.get(key)
        if v is not None and int(v) > vocab_size:
            log.info("method default %s=%s exceeds the vocabulary (%d): using %d", key, v, vocab_size, vocab_size)
        out.append(int(min(v or vocab_size, vocab_size)))
    return out[0], out[1]


def id_dtype(vocab_size: int) -> torch.dtype:
    """The smallest signed integer type that holds every token id."""
    return torch.int16 if vocab_size <= 2 ** 15 else torch.int32


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


# ---------------------------------------------------------------------- cache key
def _sha(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def model_fingerprint(path: str) -> str:
    """config.json + every weight file, every byte of each (sha256; a file's digest is cached under its identity --
    device, inode, size, mtime, ctime -- by :func:`palu_ds.integrity.cached_file_digest`, so a 70B checkpoint is
    read once, not once per run)."""
    from palu_ds.integrity import cached_file_digest

    if not os.path.isdir(path):
        return f"hub:{path}"
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name == "config.json" or name.endswith((".safetensors", ".bin", ".pt", ".gguf")):
            h.update(f"{name}:{cached_file_digest(os.path.join(path, name))}\n".encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return _sha(json.dumps(vocab).encode(), json.dumps(tokenizer.all_special_tokens).encode())


def dataset_fingerprint(ds) -> str:
    h = hashlib.sha256()
    for e in ds:
        for key in ("example_id", "input_ids", "labels", "sens_mask", "common_mask"):
            h.update(json.dumps(e[key]).encode())
    return h.hexdigest()[:16]


def cache_key(cfg, method, hp, datasets, tokenizer) -> dict:
    from palu_ds.data.prompt import prompt_format_id

    want = method.needed_parts(hp)
    ref_path = cfg.reference.model or cfg.model.path
    key = {
        "model": model_fingerprint(ref_path), "tokenizer": tokenizer_fingerprint(tokenizer),
        "prompt_format": _sha(prompt_format_id(tokenizer, cfg.data.prompt).encode()), "max_length": cfg.data.max_length,
        "n_init": cfg.data.n_init, "parts": sorted(want), "dtype": cfg.reference.dtype,
        "package_version": __version__, "cache_format": CACHE_FORMAT,
    }
    if "topk_ids" in want:
        key["K"] = int(hp["K"]) if hp.get("K") is not None else None
    if "kl" in want:
        key["k"] = int(hp["kl_topk"])
    for name, ds in sorted(datasets.items()):
        key[f"data_{name}"] = dataset_fingerprint(ds)
    return key


def _diff(stored: dict, wanted: dict) -> list[str]:
    return [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]


# ---------------------------------------------------------------------- the precompute pass
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
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
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
    K, k = topk_sizes(hp, V, cfg.method.params, cfg.reference.model or cfg.model.path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    want = method.needed_parts(hp)
    retain_sums = torch.zeros(2, dtype=torch.float64)
    for name in _cache_names(method, want, datasets):
        ds, parts = datasets[name], method.reference_parts_for(name)
        store: dict[str, list] = {p: [] for p in ("topk_ids", "kl_ids", "kl_logps")}
        ids, seq, sens_n, common_n = [], [], [], []
        for batch, real in rank_batches(ds, cfg.train.batch_size, tokenizer.pad_token_id, device):
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if not real:
                continue
            if name == method.constraint and "retain_loss" in want:
                retain_sums += answer_nll_sums(logits, batch).cpu()
            if not parts:
                continue
            t = reference_tensors(logits, batch, parts, K, k)
            for b, ex_id in enumerate(batch["example_id"].tolist()):
                ids.append(ex_id)
                _, _, s_mask, c_mask = shift(logits[b:b + 1], batch["labels"][b:b + 1],
                                             batch["sens_mask"][b:b + 1], batch["common_mask"][b:b + 1])
                sens_n.append(int(s_mask.sum()))
                common_n.append(int(c_mask.sum()))
            if "seq_logps" in t:
                seq.append(t["seq_logps"].float().cpu())
            for p in ("topk_ids", "kl_ids", "kl_logps"):
                if p in t:
                    store[p].append(t[p].cpu())
        if parts:
            _write_shard(cache_dir, name, dist.rank(), ids, sens_n, common_n, seq, store, V,
                         getattr(torch, cfg.reference.dtype))
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
        tmp = manifest_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, manifest_path)
    return dist.broadcast_object(manifest if dist.is_main() else None)  # every rank checks sizes and checksums


def _write_shard(cache_dir, name, rank, ids, sens_n, common_n, seq, store, V, dtype) -> None:
    """One rank's shard of one split, written to a temporary name and renamed (never half-written)."""
    from safetensors.torch import save_file

    def offsets(counts):
        return torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)

    tensors = {"example_ids": torch.tensor(ids, dtype=torch.int64), "sens_offsets": offsets(sens_n),
               "common_offsets": offsets(common_n)}
    if seq:
        tensors["seq_logps"] = torch.cat(seq)
    if store["topk_ids"]:
        tensors["topk_ids"] = torch.cat(store["topk_ids"]).to(id_dtype(V))
    if store["kl_ids"]:
        tensors["kl_ids"] = torch.cat(store["kl_ids"]).to(id_dtype(V))
        tensors["kl_logps"] = torch.cat(store["kl_logps"]).to(dtype)
    path = os.path.join(cache_dir, f"{name}.rank{rank}.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_reference_model(cfg, ds_config):
    """The frozen reference: eval mode, no grad; a DeepSpeed ZeRO-3 inference engine when training uses ZeRO-3."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from palu_ds.ds_config import zero_stage

    path = cfg.reference.model or cfg.model.path
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
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


# ---------------------------------------------------------------------- readers used by the training loop
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
            with open(path, encoding="utf-8") as f:
                manifest = json.load(f)
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
        rows: dict[str, list] = {}
        seq = []
        for ex in batch["example_id"].tolist():
            try:
                shard, j = self.index[name][ex]
            except KeyError:
                raise KeyError(f"example {ex} of the {name} set is not in the reference cache: the data changed "
                               "since the precompute; delete the cache to recompute") from None
            t = self.shards[shard]
            so, co = t["sens_offsets"], t["common_offsets"]
            for key, off in (("topk_ids", so), ("kl_ids", co), ("kl_logps", co)):
                if key in t:
                    rows.setdefault(key, []).append(t[key][off[j]:off[j + 1]])
            if "seq_logps" in t:
                seq.append(t["seq_logps"][j])
        dev = batch["input_ids"].device
        out = {k: torch.cat(v).to(dev).long() if k.endswith("ids") else torch.cat(v).to(dev).float()
               for k, v in rows.items()}
        if seq:
            out["seq_logps"] = torch.stack(seq).to(dev).float()
        return out

    def retain_loss(self) -> float:
        if "retain_loss" not in self.manifest:
            raise ValueError("the reference cache holds no retain loss; the method needs 'retain_loss'")
        return self.manifest["retain_loss"]


class ResidentReference:
    """The reference kept live (for comparison): computes the same packed tensors per batch on the fly."""

    def __init__(self, model, method, hp, datasets, tokenizer, batch_size: int, given: dict | None = None):
        self.model, self.method = model, method
        V = _vocab_size(model)
        self.K, self.k = topk_sizes(hp, V, given)
        self._retain = None
        self.datasets, self.tokenizer, self.batch_size = datasets, tokenizer, batch_size

    def lookup(self, name: str, batch: dict) -> dict:
        parts = self.method.reference_parts_for(name)
        if not parts:
            return {}
        with torch.no_grad():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return {k: v.float() if v.is_floating_point() else v for k, v in
                reference_tensors(logits, batch, parts, self.K, self.k).items()}

    def retain_loss(self) -> float:
        if self._retain is None:
            sums = torch.zeros(2, dtype=torch.float64)
            device = next(self.model.parameters()).device
            for batch, real in rank_batches(self.datasets[self.method.constraint], self.batch_size, self.tokenizer.pad_token_id,
                                            device):
                with torch.no_grad():
                    logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
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
        return ResidentReference(model, method, hp, datasets, tokenizer, cfg.train.batch_size, cfg.method.params)
    cache_dir = cfg.reference.cache_dir  # resolved (palu_ds.config.resolve): <output_dir>/reference_cache by default
    manifest = precompute(cfg, method, hp, datasets, tokenizer, ds_config, cache_dir)
    import gc

    gc.collect()  # the reference model of the precompute pass is gone before the policy loads
    return CachedReference(cache_dir, manifest)
