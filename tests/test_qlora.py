"""QLoRA on the CPU: a 4-bit NF4 base (bitsandbytes) with LoRA adapters, trained end to end by the
training loop on a tiny Llama saved to disk, compared with the same run on the full-precision base."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.config import LoraConfig, ModelConfig
from dpokit.models import apply_lora, load_model, save_final_model
from dpokit.training import run
from dpokit.training.tracking import read_metrics
from tests.training.test_trainer import make_config

bitsandbytes = pytest.importorskip("bitsandbytes")

STEPS = 6
QLORA = ("model.lora.enabled=true", "model.lora.r=8", "optim.lr=5e-3", f"optim.max_steps={STEPS}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.helpers import write_preference_jsonl, write_tiny_model_dir

    root = tmp_path_factory.mktemp("qlora_assets")
    write_tiny_model_dir(root / "model", hidden_size=64)
    write_preference_jsonl(root / "train.jsonl", n=64, seed=0)
    return root


def _nf4_relative_error(model_dir) -> float:
    """||W_nf4 - W|| / ||W|| over every linear weight NF4 quantizes (the decoder's projections)."""
    full = load_model(ModelConfig(name_or_path=str(model_dir)), device=torch.device("cpu"))
    quant = load_model(ModelConfig(name_or_path=str(model_dir), quantization="4bit"), device=torch.device("cpu"))
    full_weights = dict(full.named_modules())
    error = norm = 0.0
    for name, module in quant.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            w = full_weights[name].weight.detach()
            q = bitsandbytes.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            error += float((q - w).pow(2).sum())
            norm += float(w.pow(2).sum())
    return math.sqrt(error / norm)


def test_qlora_trains_on_cpu_close_to_the_full_precision_lora_run(assets, tmp_path):
    """Both runs start at exactly log 2 (the reference is the same quantized base with the adapters off,
    computed on the same arithmetic path as the policy). Their progress from log 2 after a few steps
    differs by quantization alone: NF4 moves every base weight by a relative error e (measured, about
    0.1 here), which perturbs logits and gradients by O(e); the tolerance allows 3e of the fp32 run's
    progress per step, plus 1e-3 for float noise."""
    full = run(make_config(assets, tmp_path / "fp32", *QLORA))
    quant = run(make_config(assets, tmp_path / "nf4", *QLORA, "model.quantization=4bit"))
    full_losses = [r["loss"] for r in read_metrics(full.run_dir, split="train")]
    quant_losses = [r["loss"] for r in read_metrics(quant.run_dir, split="train")]
    e = _nf4_relative_error(assets / "model")
    assert 0.01 < e < 0.2, e
    assert len(full_losses) == len(quant_losses) == STEPS
    assert quant_losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert full_losses[-1] < math.log(2) - 0.05  # the fp32 run learns, so the comparison says something
    for f, q in zip(full_losses, quant_losses, strict=True):
        assert abs((math.log(2) - q) - (math.log(2) - f)) <= 3 * e * abs(math.log(2) - f) + 1e-3, (full_losses, quant_losses)


def test_qlora_exports_a_dequantized_merged_model_that_computes_what_the_trained_policy_did(assets, tmp_path):
    """model.lora.export=merged on a 4-bit base writes a plain full-precision model (no
    quantization_config, nn.Linear weights) whose logits equal the trained peft policy's."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(name_or_path=str(assets / "model"), quantization="4bit", lora=LoraConfig(enabled=True, r=4))
    policy = apply_lora(load_model(cfg, device=torch.device("cpu")), cfg.lora)
    torch.manual_seed(0)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:  # adapters that change the model, as trained ones do
            parameter.data.normal_(0, 0.1)
    ids = torch.randint(0, 384, (2, 12))
    with torch.no_grad():
        expected = policy.eval()(ids).logits
    save_final_model(policy, None, tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(loaded.config, "quantization_config", None) is None
    assert type(loaded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_qlora_adapter_export_loads_with_transformers(assets, tmp_path):
    """model.lora.export=adapter on a 4-bit base saves the adapter, which loads onto the base with transformers."""
    from transformers import AutoModelForCausalLM

    overrides = ("optim.max_steps=2", "model.quantization=4bit", "model.lora.export=adapter")
    result = run(make_config(assets, tmp_path / "run", *QLORA, *overrides))
    loaded = AutoModelForCausalLM.from_pretrained(result.output_dir)
    assert any("lora_" in name for name, _ in loaded.named_parameters())


def test_qlora_run_stopped_and_resumed_gives_the_uninterrupted_losses(assets, tmp_path):
    """A 4-bit run stopped at step 3 and resumed from its checkpoint continues the straight run's curve:
    the checkpoint carries the adapters and optimizer state, the quantized base is loaded again."""
    common = (*QLORA, "model.quantization=4bit", "checkpoint.every_steps=3")
    straight = run(make_config(assets, tmp_path / "a", *common))
    stopped = run(make_config(assets, tmp_path / "b", *common), on_step=lambda step, metrics: step == 3)
    assert stopped.last_checkpoint.name == "checkpoint-3"
    resumed = run(make_config(assets, tmp_path / "b", *common), resume=str(stopped.last_checkpoint))
    a = [r["loss"] for r in read_metrics(straight.run_dir, split="train")]
    b = [r["loss"] for r in read_metrics(resumed.run_dir, split="train")]
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
