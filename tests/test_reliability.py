"""Faults that used to get through (issue 18), each injected here: a model changed in the middle of a weight file,
a same-size corrupted cache shard, out-of-range settings, unpickling of checkpoint files, a truncated checkpoint
file, a NaN streak, undecodable and empty data files. The 2-rank faults (a stopped peer, a broken checkpoint on
resume, a resume after a failed final save) are at the end (slow)."""
import json
import os

import pytest
import torch


# ---------------------------------------------------------------------------------------------- 1. model fingerprint
def _weights_dir(root, fill=0.0):
    from safetensors.torch import save_file

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    t = torch.full(((3 << 20) // 4,), fill)  # 3 MiB: more than the first + last MiB the old fingerprint read
    save_file({"w": t}, os.path.join(root, "model.safetensors"))
    return os.path.join(root, "model.safetensors")


def test_fingerprint_sees_a_change_in_the_middle_of_a_weight_file(tmp_path, monkeypatch):
    from palu_ds.reference import model_fingerprint

    monkeypatch.setenv("PALU_DS_CACHE", str(tmp_path / "digests"))
    path = _weights_dir(str(tmp_path / "m"))
    before = model_fingerprint(str(tmp_path / "m"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # one weight in the middle, same size (a layer norm +0.5 in the issue)
        f.seek(size // 2)
        f.write(b"\x00\x00\x00\x3f")
    assert os.path.getsize(path) == size
    assert model_fingerprint(str(tmp_path / "m")) != before


def test_file_digests_are_cached_by_identity(tmp_path, monkeypatch):
    from palu_ds import integrity
    from palu_ds.reference import model_fingerprint

    monkeypatch.setenv("PALU_DS_CACHE", str(tmp_path / "digests"))
    path = _weights_dir(str(tmp_path / "m"))
    calls = []
    real = integrity.file_digest
    monkeypatch.setattr(integrity, "file_digest", lambda p: calls.append(p) or real(p))
    first = model_fingerprint(str(tmp_path / "m"))
    assert len(calls) == 2  # config.json + the weights
    assert model_fingerprint(str(tmp_path / "m")) == first and len(calls) == 2  # a stat, no read
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        f.write(b"\x01")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: ctime still moved
    assert model_fingerprint(str(tmp_path / "m")) != first and len(calls) == 3
    assert os.path.isfile(tmp_path / "digests" / "file_digests.json")


# ---------------------------------------------------------------------------------------------- 2. shard checksums
@pytest.fixture()
def small_cache(tiny, tmp_path):
    """A PALU reference cache of the tiny model over the forget set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from palu_ds.config import load_config
    from palu_ds.data.build import build_datasets
    from palu_ds.methods import get_method
    from palu_ds.reference import precompute

    cfg = load_config(None, [f"model.path={tiny['model']}", f"data.forget.source={tiny['data']}",
                             "data.forget.config=forget10", f"data.retain.source={tiny['data']}",
                             "data.retain.config=retain90", "method.name=palu", "data.max_length=64",
                             f"train.output_dir={tmp_path}/run", "train.batch_size=4", "method.params.K=50",
                             "method.params.kl_topk=8"])
    m = get_method("palu")
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    ds = build_datasets(cfg.data, tok, m.batches)
    model = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    cache = str(tmp_path / "cache")
    precompute(cfg, m, {**m.defaults, **cfg.method.params}, ds, tok, {}, cache, model=model)
    return cache


def test_same_size_corruption_of_a_shard_is_refused_naming_it(small_cache):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from palu_ds.reference import CachedReference

    shard = os.path.join(small_cache, "forget.rank0.safetensors")
    size = os.path.getsize(shard)
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["topk_ids"] = torch.zeros_like(tensors["topk_ids"])  # the fault: top-K ids zeroed
    save_file(tensors, shard)
    assert os.path.getsize(shard) == size
    with pytest.raises(RuntimeError, match=r"forget\.rank0\.safetensors is corrupt \(its content differs"):
        CachedReference(small_cache)


def test_a_cache_without_checksums_is_refused(small_cache):
    from palu_ds.reference import MANIFEST, CachedReference

    path = os.path.join(small_cache, MANIFEST)
    manifest = json.load(open(path))
    del manifest["shard_sha256"]
    json.dump(manifest, open(path, "w"))
    with pytest.raises(RuntimeError, match=r"forget\.rank0\.safetensors is corrupt \(the manifest records no chec"):
        CachedReference(small_cache)
