"""Optional speed-ups that change no result: compiling the decoder layers.

``torch.compile`` fuses the many small element-wise kernels of a transformer layer (RMSNorm,
rotary embeddings, SiLU gating, residual adds) into a few, which on CPU is where much of a small
model's step time goes. Layers are compiled one by one, in place (``module.compile``), so:

* parameter names and ``state_dict`` keys do not change (checkpoints and exports are unaffected);
* the code around the layers (mask building, embeddings, the chunked output layer) stays eager,
  so nothing there can break the graph;
* ``dynamic=True`` gives one graph for all sequence lengths instead of a recompile per batch shape.

The first steps pay the compile time (tens of seconds on a small CPU), so it pays off on runs of
more than a few hundred steps. Off by default (``model.compile``).
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (plain or peft-wrapped)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model  # type: ignore[operator]  # transformers method via nn.Module.__getattr__
    for name in ("layers", "h", "blocks", "block"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return list(layers)
    return []


def compile_decoder_layers(model: nn.Module, *, dynamic: bool = True) -> int:
    """``torch.compile`` every decoder layer in place; returns how many were compiled (0 when the
    architecture's layers were not found, in which case the model runs eagerly)."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic)
    if not layers:
        logger.warning("model.compile: no decoder layers found on %s; running without compilation", type(model).__name__)
    return len(layers)
