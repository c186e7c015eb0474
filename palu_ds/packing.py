"""Padding-free forward: the rows of a micro-batch laid end to end in one sequence, attention kept within each row.

A right-padded batch of B rows of width T costs B·T positions in every projection and MLP, whatever the rows' real
lengths; on TOFU at max length 128 (forget10 + retain90, 4 + 4 rows) 23% of them are padding. Packed, the model
computes the ``N = sum_b len_b`` real tokens only -- as flash-attention's varlen kernels and TRL's ``padding_free``
do on GPUs -- and attention runs on each row's segment alone (:func:`varlen_attention`: one causal
``scaled_dot_product_attention`` per row, so its cost stays sum_b len_b², not N²). Every position sees exactly the
tokens it sees in the padded batch, at the same position id (0..len_b-1, what a right-padded row gets): the hidden
states equal the padded forward's up to float summation order.

How it reaches the attention: transformers' attention modules look their function up by
``config._attn_implementation`` at every call, and pass the model's keyword arguments through. :func:`enable` points
the policy's config at :data:`VARLEN` (registered here, with sdpa's mask function) when the model runs sdpa -- other
implementations (eager, flash-attention, flex) keep their padded rows, with a warning --; :class:`RowPacking` gives the
forward its packed ``input_ids`` / ``position_ids`` and the rows' boundaries as ``cu_seq_lens_q`` (the name
flash-attention's varlen path reads); without boundaries :func:`varlen_attention` is transformers' sdpa unchanged,
so evaluation and generation on the same model are unaffected. Nothing is saved: ``_attn_implementation`` is not
written to config.json. :func:`verify` checks a model against its own padded forward before training, so a model
whose attention does not go through transformers' attention interface is refused, never silently mixed.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from palu_ds.lm_head import base_config, probe, unwrap

VARLEN = "palu_ds_varlen"
log = logging.getLogger("palu_ds")


class PackingUnsupported(ValueError):
    """The model's forward cannot run packed rows (it mixes them, or refuses the packed inputs)."""


def _what_to_do() -> str:
    return "set train.padding_free: false (right-padded rows, the model's own attention)"


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """Causal attention within each packed row: transformers' attention-function signature, [1, H, N, d] inputs.

    With ``cu_seq_lens_q`` = [0, len_0, len_0+len_1, ..., N] (the rows' boundaries), row b's output is
    ``softmax(Q_b K_bᵀ · scale + causal) V_b`` over its own segment only -- what the padded batch computes for that
    row, its padding keys masked out -- through transformers' own sdpa function per segment (GQA, scale, dropout and
    its checks as for ``attn_implementation="sdpa"``). Source: flash-attention's ``flash_attn_varlen_func``
    (Dao, 2023), which takes the same boundaries. Example: rows of 3 and 2 tokens, cu = [0, 3, 5]: token 3 attends to
    itself only, token 4 to tokens 3 and 4 -- never to 0..2. Gradient: each segment's sdpa backward; the segments
    share no entries, so ∂out_b/∂(Q, K, V)_c = 0 for c ≠ b.

    Under CPU autocast the segments are attended in fp32 (autocast would run them in bf16), the output cast to the
    autocast dtype: torch's CPU flash-attention backward in bf16 ran ~3.5x slower than in fp32 on the project's AMX
    box (one SmolLM2 forward + backward under autocast ran at 1.29x the tokens/s with the fp32 attention;
    BENCHMARKS.md), and fp32 is the more precise of the two.

    Without ``cu_seq_lens_q`` it is ``sdpa_attention_forward`` with the model's mask (padded batches, generation).
    Sliding-window attention shorter than a row and additive position biases have no per-segment form here: refused.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    lengths = (cu[1:] - cu[:-1]).tolist()
    window = kwargs.get("sliding_window")
    if kwargs.get("position_bias") is not None or (window is not None and max(lengths) > window):
        raise PackingUnsupported(f"{type(module).__name__}: packed rows support plain causal attention only (this "
                                 f"layer has a position bias or a sliding window of {window} tokens); {_what_to_do()}")
    if query.shape[0] != 1 or sum(lengths) != query.shape[2]:
        raise ValueError(f"packed attention: cu_seq_lens_q covers {sum(lengths)} tokens of a [{query.shape[0]}, "
                         f"{query.shape[2]}] packed batch")
    cpu_autocast = query.device.type == "cpu" and torch.is_autocast_enabled("cpu")  # see the docstring
    if cpu_autocast:
        query, key, value = query.float(), key.float(), value.float()
    with torch.autocast("cpu", enabled=False) if cpu_autocast else nullcontext():
        outs = [sdpa_attention_forward(module, q, k, v, None, dropout=dropout, scaling=scaling, is_causal=True,
                                       **kwargs)[0]
                for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
                if q.shape[2]]
    out = torch.cat(outs, 1)
    return (out.to(torch.get_autocast_dtype("cpu")) if cpu_autocast else out), None


def register() -> None:
    """Register :data:`VARLEN` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


def attention_of(model) -> str | None:
    """The model's attention implementation (``config._attn_implementation``)."""
    return getattr(base_config(model), "_attn_implementation", None)


def enable(model) -> bool:
    """Point ``model``'s attention at :func:`varlen_attention` (in memory only; not saved with the model) if it runs
    transformers' sdpa, which :func:`varlen_attention` reproduces without boundaries; False (unchanged) for any other
    implementation (eager -- e.g. Gemma-2's soft-capped attention --, flash-attention, flex) or a transformers without
    the attention interfaces."""
    if attention_of(model) not in ("sdpa", VARLEN):
        return False
    try:
        register()
    except ImportError:
        return False
    base_config(model)._attn_implementation = VARLEN
    return True


def start(model, wanted: bool) -> bool:
    """Whether ``model``'s forwards run padding-free (``train.padding_free`` = ``wanted``): a model on sdpa is
    :func:`enable`-d and checked against its own padded forward (:func:`verify`; every rank must call this); any
    other attention keeps its padded rows, with a warning. A failed check is a ConfigError (nothing trained or
    written) naming the model and ``train.padding_free: false``."""
    if not wanted:
        return False
    if not enable(model):
        log.warning("train.padding_free: %s runs attn_implementation=%s, which the padding-free forward does not "
                    "reproduce; rows stay padded", type(unwrap(model)).__name__, attention_of(model))
        return False
    try:
        verify(model)
    except PackingUnsupported as e:
        from palu_ds.config import ConfigError

        raise ConfigError(f"train.padding_free: {e}") from e
    return True


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, packed: bool, **kwargs):
    """``model``'s output on a right-padded batch, and the function that puts a packed output back into the padded
    layout: rows end to end (:class:`RowPacking`) when ``packed``, else the padded batch as given (the identity)."""
    if not packed:
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs), (lambda t: t)
    rows = RowPacking(attention_mask)
    return model(**rows.inputs(input_ids), **kwargs), rows.unpack


class RowPacking:
    """The rows of a right-padded batch (``attention_mask`` [B, T]) laid end to end: N real tokens in one row.

    :meth:`inputs` gives the model its packed arguments; :meth:`unpack` puts a packed output [1, N, ...] back into the
    padded layout [B, T, ...] (zeros at padding), so everything downstream -- answer masks, the LM head, the losses,
    a captured layer -- reads the rows as before."""

    def __init__(self, attention_mask: torch.Tensor):
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]):
            raise ValueError("padding-free forward: every row must be right-padded (its real tokens first, then "
                             "padding only)")
        self.mask = mask
        # the boundaries live on the host (one copy per batch): every layer's attention reads them without a sync
        self.cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to("cpu", torch.int32)

    def inputs(self, input_ids: torch.Tensor) -> dict:
        """Keyword arguments of the packed forward of ``input_ids`` [B, T]."""
        longest = int((self.cu[1:] - self.cu[:-1]).max())
        positions = torch.arange(self.mask.shape[1], device=input_ids.device).expand_as(self.mask)[self.mask]
        return {"input_ids": input_ids[self.mask][None], "position_ids": positions[None], "use_cache": False,
                "cu_seq_lens_q": self.cu, "cu_seq_lens_k": self.cu, "max_length_q": longest, "max_length_k": longest}

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, N, ...] -> [B, T, ...], zeros at the padding positions (differentiable)."""
        out = packed.new_zeros(*self.mask.shape, *packed.shape[2:])
        out[self.mask] = packed[0]  # row copies (index_put): ~2.5x faster on CPU than masked_scatter's expanded mask
        return out


def verify(model, atol: float = 1e-4, rtol: float = 1e-3) -> float:
    """Check the packed forward of two rows (7 and 4 tokens) against the padded one; returns the max abs difference
    of the last hidden states. In eval mode with the RNG state restored, no gradient: training is not perturbed.
    Every rank must call it (ZeRO-3 gathers inside). Raises :class:`PackingUnsupported` naming the model."""
    name = type(base_config(model)).__name__.removesuffix("Config") or type(unwrap(model)).__name__
    try:
        with probe(model, (2, 7)) as ids, torch.no_grad():
            mask = torch.ones_like(ids)
            mask[1, 4:] = 0
            packing = RowPacking(mask)
            want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            got = packing.unpack(model(**packing.inputs(ids), output_hidden_states=True).hidden_states[-1])
    except (TypeError, ValueError) as e:
        raise PackingUnsupported(f"{name}: the model's forward does not take packed rows ({e}); {_what_to_do()}")
    keep = mask.bool()
    diff = (got[keep].float() - want[keep].float()).abs().max().item()
    if not torch.allclose(got[keep].float(), want[keep].float(), atol=atol, rtol=rtol):
        raise PackingUnsupported(f"{name}: packed rows give hidden states that differ from the padded forward (max "
                                 f"|diff| {diff:.3g}): its attention does not keep rows apart through "
                                 f"transformers' attention interface; {_what_to_do()}")
    return diff
