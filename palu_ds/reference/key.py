"""The reference cache's key: what the cached tensors depend on (the reference model's bytes, the tokenizer, the
prompt format, the data, K, k, N, max_length, dtype, package and format versions).  Rank 0 computes it; a cache whose
manifest holds another key is refused, naming each differing field (:class:`CacheMismatch`)."""

from __future__ import annotations

import hashlib
import json
import os

from palu_ds import __version__
from palu_ds.methods import REFERENCE_PARTS


MANIFEST = "manifest.json"
CACHE_FORMAT = 2  # 2: the manifest records each shard's sha256 (``shard_sha256``), checked when the shard is opened


class CacheMismatch(RuntimeError):
    """A cache made for another run (another key); the message names the differing fields."""


def _sha(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def read_manifest(path: str) -> dict:
    """A cache's manifest.json; an unreadable one (truncated, not JSON) is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        if not isinstance(manifest, dict) or "key" not in manifest:
            raise ValueError("not a palu_ds reference-cache manifest")
    except (ValueError, UnicodeDecodeError) as e:
        raise RuntimeError(f"{path} is unreadable ({e}): the reference cache's manifest is damaged; delete "
                           f"{os.path.dirname(path)} and rerun launch/precompute.py (or train, which recomputes it)"
                           ) from None
    return manifest


def hub_snapshot(name: str) -> str:
    """The local snapshot folder of hub model ``name`` at the revision its ``main`` ref resolves to (the offline
    cache first, as transformers resolves it; else config.json and the weight files are fetched)."""
    from huggingface_hub import constants, snapshot_download

    patterns = ["config.json", "*.safetensors", "*.bin", "*.pt", "*.gguf"]
    cache_dir = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        return snapshot_download(name, cache_dir=cache_dir, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - not in the local cache: the same files the model load would fetch
        pass
    try:
        return snapshot_download(name, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 - named: neither a folder nor a reachable hub model
        raise RuntimeError(f"model {name}: not a local folder, not in the hub cache {cache_dir}, and not fetched "
                           f"from the hub ({type(e).__name__}: {str(e)[:200]})") from None


def model_fingerprint(path: str) -> str:
    """config.json + every weight file, every byte of each (sha256; a file's digest is cached under its identity --
    device, inode, size, mtime, ctime -- by :func:`palu_ds.integrity.cached_file_digest`, so a 70B checkpoint is
    read once, not once per run). A hub name is fingerprinted by its resolved revision (the snapshot's commit hash)
    and the same digest of that snapshot's files."""
    from palu_ds.integrity import cached_file_digest

    if not os.path.isdir(path):
        snapshot = hub_snapshot(path)
        return f"hub:{path}@{os.path.basename(snapshot)}:{model_fingerprint(snapshot)}"
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
    ref_path = cfg.reference.model  # resolved (palu_ds.config.resolve): model.path unless set
    key = {
        "model": model_fingerprint(ref_path), "tokenizer": tokenizer_fingerprint(tokenizer),
        "prompt_format": _sha(prompt_format_id(tokenizer, cfg.data.prompt).encode()), "max_length": cfg.data.max_length,
        "n_init": cfg.data.n_init, "parts": sorted(want), "dtype": cfg.reference.dtype,
        "package_version": __version__, "cache_format": CACHE_FORMAT,
    }
    for name, part in REFERENCE_PARTS.items():  # the hyper-parameters each wanted part records
        if name in want:
            key.update({f: None if hp.get(h) is None else int(hp[h]) for f, h in part.key.items()})
    for name, ds in sorted(datasets.items()):
        key[f"data_{name}"] = dataset_fingerprint(ds)
    return key


def _diff(stored: dict, wanted: dict) -> list[str]:
    return [k for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
