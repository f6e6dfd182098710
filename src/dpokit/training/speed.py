"""Optional speed-ups that change no result: compiling the decoder layers.

``torch.compile`` fuses the many small element-wise kernels of a transformer layer (RMSNorm,
rotary embeddings, SiLU gating, residual adds) into a few, which on CPU is where much of a small
model's step time goes. Layers are compiled one by one, in place (``module.compile``), so:

* parameter names and ``state_dict`` keys do not change (checkpoints and exports are unaffected);
* the code around the layers (mask building, embeddings, the chunked output layer) stays eager,
  so nothing there can break the graph;
* ``dynamic=True`` gives one graph for all sequence lengths instead of a recompile per batch shape.

The first steps pay the compile time (tens of seconds on a small CPU). Inductor's on-disk caches
(the FX graph cache and the AOTAutograd cache, both on by default in torch) keep the compiled
kernels; :func:`compile_decoder_layers` points them at ``<data.cache_dir>/compile`` unless
``TORCHINDUCTOR_CACHE_DIR`` is set, so a later run with the same model and shapes loads them
instead of compiling again (dynamo still traces each layer, which takes a few seconds).
Off by default (``model.compile``; the README gives the numbers behind that choice).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

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


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def use_compile_cache(cache_dir: str | Path) -> str:
    """Keep inductor's compiled artifacts in ``cache_dir`` (absolute) unless ``TORCHINDUCTOR_CACHE_DIR``
    is already set (by the user, or by an earlier compilation in this process); returns the directory
    in use. A value equal to inductor's own default (``/tmp/torchinductor_<user>``) counts as unset:
    inductor writes its default into the environment the first time anything asks for its cache
    directory (importing a transformers model class does), so it is not a user's choice."""
    from dpokit.compat import inductor_default_cache_dir

    current = os.environ.get(COMPILE_CACHE_ENV)
    if not current or os.path.abspath(current) == inductor_default_cache_dir():
        os.environ[COMPILE_CACHE_ENV] = str(Path(cache_dir).expanduser().resolve())
    return os.environ[COMPILE_CACHE_ENV]


def compile_decoder_layers(model: nn.Module, *, dynamic: bool = True, cache_dir: str | Path | None = None) -> int:
    """``torch.compile`` every decoder layer in place; returns how many were compiled (0 when the
    architecture's layers were not found, in which case the model runs eagerly). ``cache_dir``: where
    the compiled artifacts persist between runs (see :func:`use_compile_cache`)."""
    if cache_dir is not None:
        logger.info("model.compile: compiled kernels cached in %s", use_compile_cache(cache_dir))
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=dynamic)
    if not layers:
        logger.warning("model.compile: no decoder layers found on %s; running without compilation", type(model).__name__)
    return len(layers)
