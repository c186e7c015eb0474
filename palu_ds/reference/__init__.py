"""Reference-model tensors for a batch: a precomputed cache (default), a resident model, or none.

The precompute pass runs the frozen reference once over the data (data-parallel, fixed order, eval mode, no grad)
and writes exactly what the method needs (``Method.reference_parts``), per example:

* ``topk_ids``  the reference's top-K ids at the I_init positions (PALU), int16/int32
* ``kl``        the reference's top-k ids and log-probs at the common positions (sparse KL), values fp16/bf16
* ``seq_logps`` the reference's summed answer log-prob per sequence (NPO, IdkDPO), fp32
* ``answer_topk`` the target and the reference's top k-1 other ids, with their log-probs, at every answer position
  (UNDIAL), values fp16/bf16
* ``hidden``    the reference's hidden states of the method's decoder layer at the answer tokens (RMU), fp16/bf16
* ``retain_loss`` the reference's mean answer NLL on the retain set (ε = (1 + a)·L_retain(ref)), in the manifest

Layout of a cache dir: ``<name>.rank<r>.safetensors`` (one shard per data set and rank, holding the example ids and
row offsets next to the rows), and ``manifest.json`` written last by rank 0 through an atomic rename. The manifest
holds the cache key; a cache without manifest is incomplete and never read; a manifest whose key differs from the
run's is refused, naming the field. Training reads the shards memory-mapped and packs rows per batch by example id,
so any shuffle and any training world size work.

The package: :mod:`.parts` (what a method needs, computed from reference logits with palu_ds.losses), :mod:`.key`
(the cache key), :mod:`.compute` (the precompute pass and the reference model), :mod:`.readers` (what the training
loop asks).  Every name is importable from ``palu_ds.reference``.
"""

from .compute import load_reference_model, precompute, rank_batches
from .key import (CACHE_FORMAT, MANIFEST, CacheMismatch, cache_key, dataset_fingerprint, model_fingerprint,
                  tokenizer_fingerprint)
from .parts import answer_nll_sums, id_dtype, reference_tensors, topk_sizes
from .readers import CachedReference, NoReference, ResidentReference, build_reference

__all__ = ["CACHE_FORMAT", "MANIFEST", "CacheMismatch", "CachedReference", "NoReference",
           "ResidentReference", "answer_nll_sums", "build_reference", "cache_key", "dataset_fingerprint",
           "id_dtype", "load_reference_model", "model_fingerprint", "precompute",
           "rank_batches", "reference_tensors", "tokenizer_fingerprint", "topk_sizes"]
