"""Reference-model tensors for a batch: none (reference-free methods), precomputed cache, or a resident model."""

from __future__ import annotations


class NoReference:
    """Reference-free methods: nothing to look up."""

    def lookup(self, name: str, batch: dict) -> dict:
        return {}

    def retain_loss(self) -> float:
        raise ValueError("dual.epsilon_rel needs the reference retain loss, but reference.mode is none: "
                         "give dual.epsilon (absolute) or use a reference")


def build_reference(cfg, method, hp, datasets, tokenizer, ds_config):
    if cfg.reference.mode == "none" or not method.reference_parts:
        return NoReference()
    raise NotImplementedError(f"reference.mode={cfg.reference.mode} is not available yet")
