"""The output of one decoder layer of a model, captured by a forward hook -- what a method that reads a layer's hidden
states (``Method.hidden_layer``: RMU) gets from the policy (palu_ds.engine) and from the reference (the precompute
pass's ``hidden`` part), the same way for both.

The layer is found by path, through the wrappers a run puts around the model: a DeepSpeed engine (``.module``), a
peft LoRA model (``base_model.model.model.layers``), any Hugging Face causal LM whose blocks are a ``ModuleList``
named ``layers`` / ``h`` / ``blocks`` with ``config.num_hidden_layers`` entries. The hook sits on the module itself,
so under ZeRO-3 -- parameters partitioned, gathered by DeepSpeed's own hooks around the module's forward -- it still
sees the layer's full output activations; the captured tensor is part of the autograd graph (gradients flow back
through it into the layers below).
"""

from __future__ import annotations

import torch

BLOCK_LISTS = ("layers", "h", "blocks")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of ``model`` (unwrapped from a DeepSpeed engine / peft model), in order."""
    model = getattr(model, "module", model)
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS
             and (n is None or len(m) == n)]
    if len(found) != 1:
        raise ValueError(f"{type(model).__name__}: expected one list of decoder layers (a ModuleList named "
                         f"{'/'.join(BLOCK_LISTS)} with config.num_hidden_layers={n} entries), found "
                         f"{[name for name, _ in found] or 'none'}; methods that read a layer's hidden states "
                         "(method.params.layer) need it")
    return found[0][1]


class LayerCapture:
    """A forward hook on decoder layer ``layer`` of ``model``; after each forward, :attr:`output` holds the layer's
    output hidden states [B, T, D] (the first element when the layer returns a tuple). :meth:`remove` unhooks."""

    def __init__(self, model, layer: int):
        layers = decoder_layers(model)
        if not 0 <= int(layer) < len(layers):
            raise ValueError(f"method.params.layer={layer}: the model has {len(layers)} decoder layers "
                             f"(0..{len(layers) - 1}); choose one of them")
        self.layer, self.output = int(layer), None
        self._handle = layers[self.layer].register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.output = output[0] if isinstance(output, (tuple, list)) else output

    def remove(self) -> None:
        self._handle.remove()
        self.output = None

    def __enter__(self) -> "LayerCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
