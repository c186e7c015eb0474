"""The LM head exactly as the model's own forward applies it -- the one place that knows an architecture's head.

The engine's answer-only path (``train.answer_only_logits``) does not let the model form logits: it takes the last
hidden states and calls the head itself on the answer positions only.  Some causal LMs do more than ``W h + b``
after (or before) their head; the head path must do the same or the training logits differ from the model's.
What transformers 5.24's ``*ForCausalLM.forward`` do (read from their source):

* Gemma-2/3/3n/4, VaultGemma, NanoChat, Beam: ``z = cap * tanh(z / cap)`` with ``config.final_logit_softcapping``
  (RecurrentGemma: ``config.logits_soft_cap``);
* Cohere, Cohere2, Cohere2-MoE, Cohere-Compass: ``z = z * config.logit_scale``;
* Granite (and its MoE / SWA / hybrid variants): ``z = z / config.logits_scaling``; HyperCLOVAX:
  ``z = z * config.logits_scaling``; Falcon-H1: ``z = z * config.lm_head_multiplier``;
* MiniCPM3: ``h = h / config.logits_scaling`` before the head;
* Llama, Qwen2/3, Mistral, Phi, SmolLM, OLMo, ... (the large majority): nothing.

Architectures whose head is something else (a vocabulary slice, a learned soft-cap module, a decoder after the
head, n-gram streams, ...) are refused by name (:data:`REFUSED`); for any other, :func:`verify` compares the head
path with the model's own logits once, on a few tokens, and refuses on a mismatch.  Either way the error says to
set ``train.answer_only_logits: false`` (the model then forms its own full logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# model_type -> config attribute of the final logit soft-cap ``cap * tanh(z / cap)`` (None in the config = off)
SOFTCAP = {"gemma2": "final_logit_softcapping", "gemma3_text": "final_logit_softcapping",
           "gemma3n_text": "final_logit_softcapping", "gemma4_text": "final_logit_softcapping",
           "gemma4_unified_text": "final_logit_softcapping", "vaultgemma": "final_logit_softcapping",
           "nanochat": "final_logit_softcapping", "beam": "final_logit_softcapping",
           "recurrent_gemma": "logits_soft_cap"}
# model_type -> (config attribute, power): logits *= attr ** power
SCALE = {"cohere": ("logit_scale", 1), "cohere2": ("logit_scale", 1), "cohere2_moe": ("logit_scale", 1),
         "cohere_compass_text": ("logit_scale", 1),
         "granite": ("logits_scaling", -1), "granite_swa": ("logits_scaling", -1), "granitemoe": ("logits_scaling", -1),
         "granitemoe_swa": ("logits_scaling", -1), "granitemoehybrid": ("logits_scaling", -1),
         "granitemoeshared": ("logits_scaling", -1), "hyperclovax": ("logits_scaling", 1),
         "falcon_h1": ("lm_head_multiplier", 1)}
# model_type -> (config attribute, power): hidden *= attr ** power before the head
HIDDEN_SCALE = {"minicpm3": ("logits_scaling", -1)}
REFUSED = {
    "inkling_text": "divides the hidden states by a muP multiplier and slices the padded vocabulary",
    "inkling2_text": "applies a learned soft-cap module after the head",
    "gemma4_assistant": "projects and masks the hidden states with ordered embeddings",
    "gemma4_unified_assistant": "projects and masks the hidden states with ordered embeddings",
    "prophetnet": "predicts n-gram streams",
    "clvp_decoder": "applies a final norm inside the causal-LM head",
    "modernbert-decoder": "runs a decoder layer after the head",
    "electra": "runs a generator projection before the head",
    "xlstm": "has no logits_to_keep head and chunks its inference logits",
    "cpmant": "scales its logits inside the base model",
}


class UnsupportedHead(ValueError):
    """The answer-only head cannot reproduce this architecture's logits."""


def _what_to_do() -> str:
    return "set train.answer_only_logits: false (the model then forms its own full logits)"


@dataclass(frozen=True)
class HeadSpec:
    """How one architecture turns last hidden states into logits: ``post(head(h * hidden_scale))`` with
    ``post(z) = softcap(z * scale)``, ``softcap(z) = cap * tanh(z / cap)`` (identity when ``softcap`` is None)."""

    arch: str
    scale: float = 1.0
    softcap: float | None = None
    hidden_scale: float = 1.0

    @property
    def is_linear(self) -> bool:
        """Whether the logits are affine in the head's output (no soft-cap): then e.g. mean(z) = h . mean(W)."""
        return self.softcap is None

    def prepare(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.hidden_scale == 1.0 else hidden * self.hidden_scale

    def post(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model applies after its head (same operations, same order as its forward)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _config(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    return getattr(base, "config", None)


def head_spec(model) -> HeadSpec:
    """The :class:`HeadSpec` of a (possibly peft-wrapped) transformers causal LM; :class:`UnsupportedHead` for an
    architecture in :data:`REFUSED`."""
    cfg = _config(model)
    arch = getattr(cfg, "model_type", None) or type(model).__name__
    if arch in REFUSED:
        raise UnsupportedHead(f"architecture {arch!r} {REFUSED[arch]}: the answer-only LM head cannot reproduce its "
                              f"logits; {_what_to_do()}")
    kw = {}
    if arch in SOFTCAP and getattr(cfg, SOFTCAP[arch], None) is not None:
        kw["softcap"] = float(getattr(cfg, SOFTCAP[arch]))
    if arch in SCALE:
        attr, power = SCALE[arch]
        kw["scale"] = float(getattr(cfg, attr)) ** power
    if arch in HIDDEN_SCALE:
        attr, power = HIDDEN_SCALE[arch]
        kw["hidden_scale"] = float(getattr(cfg, attr)) ** power
    return HeadSpec(arch, **kw)


def output_head(model) -> torch.nn.Module:
    base = model.module if hasattr(model, "module") and not hasattr(model, "get_output_embeddings") else model
    head = base.get_output_embeddings()
    if head is None:
        raise UnsupportedHead(f"{type(base).__name__} has no output embeddings (get_output_embeddings() is None); "
                              f"{_what_to_do()}")
    return head


def lm_logits(model, hidden: torch.Tensor, spec: HeadSpec | None = None) -> torch.Tensor:
    """The model's own logits from its last hidden states ``hidden`` [..., d] (any subset of positions)."""
    spec = spec or head_spec(model)
    return spec.post(output_head(model)(spec.prepare(hidden)))


@torch.no_grad()
def verify(model, spec: HeadSpec | None = None, n_tokens: int = 8, atol: float = 1e-4, rtol: float = 1e-3) -> float:
    """Check the head path against the model's own forward on ``n_tokens`` tokens; returns the max abs difference.

    Both come from ONE forward (``output_hidden_states=True``, full logits), in eval mode and with the RNG state
    restored, so dropout cannot make them differ and training is not perturbed.  Every rank must call it (ZeRO-3
    gathers inside).  Raises :class:`UnsupportedHead` naming the architecture on a mismatch.
    """
    spec = spec or head_spec(model)
    module = model.module if hasattr(model, "module") and hasattr(model, "backward") else model  # DeepSpeed engine
    cfg = _config(module)
    vocab = int(getattr(cfg, "vocab_size", 0) or output_head(module).weight.shape[0])
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    ids = (torch.arange(n_tokens, device=device) * 7919 % max(1, vocab - 1) + 1)[None]
    was_training = module.training
    module.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            want = out.logits.float()
            got = lm_logits(module, out.hidden_states[-1], spec).float()
    finally:
        module.train(was_training)
    diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    if not (got.shape == want.shape and torch.allclose(got, want, atol=atol, rtol=rtol)):
        raise UnsupportedHead(f"architecture {spec.arch!r}: the answer-only LM head gives logits that differ from "
                              f"the model's own forward (max |diff| {diff:.3g}, shapes {tuple(got.shape)} vs "
                              f"{tuple(want.shape)}); {_what_to_do()}")
    return diff
