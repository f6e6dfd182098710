"""Model loading, dropout, LoRA and the live reference strategies, on tiny models saved to disk."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dpokit.config import LoraConfig, ModelConfig
from dpokit.data import PaddedCollator, prepare_from_examples
from dpokit.data.schema import PreferenceExample
from dpokit.errors import ConfigError
from dpokit.logprobs import compute_logps
from dpokit.models import apply_lora, disable_dropout, load_model_and_tokenizer, save_final_model
from tests.helpers import preference_rows, tiny_gpt2, tiny_llama, write_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny")


def items_for(tokenizer, n: int = 6) -> list[dict]:
    examples = [
        PreferenceExample(prompt=row["prompt"], responses=[row["chosen"], row["rejected"]], scores=None, source=f"test:{i}")
        for i, row in enumerate(preference_rows(n))
    ]
    return list(prepare_from_examples(examples, tokenizer).items)


def batch_for(tokenizer, n: int = 6):
    return PaddedCollator(tokenizer.pad_token_id)(items_for(tokenizer, n))


def test_loads_from_a_local_directory_with_dtype_and_attention_kernel(model_dir):
    model, tokenizer = load_model_and_tokenizer(
        ModelConfig(name_or_path=str(model_dir), dtype="bfloat16", attn_implementation="eager", device="cpu")
    )
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert tokenizer.pad_token == "<|pad|>"


def test_missing_pad_token_reuses_eos_without_resizing_embeddings(tmp_path):
    path = write_tiny_model_dir(tmp_path / "nopad", pad_token=False)
    assert json.loads((path / "config.json").read_text()).get("pad_token_id") is None
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(path), device="cpu"))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|eos|>"
    assert model.config.pad_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == 384  # not resized
    # Padding with eos changes nothing: padded positions are masked and never scored.
    items = items_for(tokenizer)
    collate = PaddedCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        padded = compute_logps(model.eval(), collate(items)).logps
        alone = torch.cat([compute_logps(model, collate([item])).logps for item in items])
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)


def test_remote_code_is_not_run_unless_asked(tmp_path):
    """A checkpoint whose config points at its own modeling file: without trust_remote_code the
    load is refused and the file is never imported."""
    path = write_tiny_model_dir(tmp_path / "custom")
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}
    config["model_type"] = "evil-custom"
    (path / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "executed"
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (path / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ConfigError, match="cannot load"):
        load_model_and_tokenizer(ModelConfig(name_or_path=str(path), device="cpu"))
    assert not marker.exists()


@pytest.mark.parametrize(
    "build", [lambda: tiny_llama(attention_dropout=0.5), lambda: tiny_gpt2(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)]
)
def test_disable_dropout_makes_train_mode_forward_deterministic(build):
    model = build().train()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is live
        disable_dropout(model)
        torch.testing.assert_close(model(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def _perturb_adapters(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("export", ["merged", "adapter"])
def test_exported_lora_model_loads_with_automodel_and_gives_the_same_logps(model_dir, tmp_path, export):
    from transformers import AutoModelForCausalLM

    policy, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir), device="cpu"))
    policy = apply_lora(policy, LoraConfig(enabled=True, r=4))
    _perturb_adapters(policy, seed=1)
    batch = batch_for(tokenizer)
    with torch.no_grad():
        expected = compute_logps(policy.eval(), batch).logps
    out = save_final_model(policy, tokenizer, tmp_path / "out", lora_export=export)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(compute_logps(reloaded, batch).logps, expected, rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer_config.json").is_file()


def test_quantization_without_bitsandbytes_is_a_clear_config_error(model_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed: importing it fails
    cfg = ModelConfig(name_or_path=str(model_dir), quantization="4bit", device="cpu", lora=LoraConfig(enabled=True))
    with pytest.raises(ConfigError, match="bitsandbytes"):
        load_model_and_tokenizer(cfg)


# ------------------------------------------------------------------ loading for inference


def test_load_policy_finds_a_checkpoints_model_and_its_run_config(model_dir, tmp_path):
    import shutil

    import yaml

    from dpokit.models import LoadOptions, load_policy

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "checkpoint-4" / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(model_dir)}, "loss": {"beta": 0.3}}))
    loaded = load_policy(run / "checkpoint-4", LoadOptions(device="cpu"))
    assert loaded.kind == "model" and not loaded.is_adapter and not loaded.model.training
    assert loaded.run_config["loss"]["beta"] == 0.3
    assert loaded.tokenizer.pad_token == "<|pad|>"
    assert next(loaded.model.parameters()).dtype == torch.float32  # "auto": the checkpoint's dtype


def test_load_policy_of_a_lora_adapter_keeps_the_adapter_switchable(model_dir, tmp_path):
    from dpokit.models import LoadOptions, is_peft_model, load_policy

    policy, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir), device="cpu"))
    policy = apply_lora(policy, LoraConfig(enabled=True, r=4))
    _perturb_adapters(policy)
    save_final_model(policy, tokenizer, tmp_path / "adapter", lora_export="adapter")
    loaded = load_policy(tmp_path / "adapter", LoadOptions(dtype="float32"))
    assert loaded.is_adapter and loaded.base_path == str(model_dir) and is_peft_model(loaded.model)
    batch = batch_for(loaded.tokenizer)
    with torch.no_grad():
        base = compute_logps(load_policy(model_dir).model, batch).logps
        with loaded.model.disable_adapter():
            torch.testing.assert_close(compute_logps(loaded.model, batch).logps, base)
        assert not torch.allclose(compute_logps(loaded.model, batch).logps, base, atol=1e-3)


def test_bad_locations_dtypes_and_devices_are_located_config_errors(model_dir, tmp_path):
    from dpokit.models import LoadOptions, load_policy, load_tokenizer, resolve_device

    with pytest.raises(ConfigError, match="missing: no such file or directory"):
        load_policy(tmp_path / "missing")
    with pytest.raises(ConfigError, match="dtype must be one of auto, float32"):
        load_policy(model_dir, LoadOptions(dtype="float8"))
    with pytest.raises(ConfigError, match="--device 'tpu!'"):
        resolve_device("tpu!", setting="--device")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_policy(model_dir, LoadOptions(device="cuda"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="cannot load a causal language model"):
        load_policy(empty)
    # The tokenizer comes from the first location that has one.
    assert load_tokenizer(empty, model_dir).pad_token == "<|pad|>"


def test_loading_shows_no_progress_bars_and_restores_the_setting(model_dir, capfd):
    from transformers import AutoModelForCausalLM

    from dpokit.compat import set_transformers_progress_bars, transformers_progress_bars_enabled
    from dpokit.models import load_model_and_tokenizer, load_policy

    set_transformers_progress_bars(True)
    AutoModelForCausalLM.from_pretrained(model_dir)
    assert "Loading weights" in capfd.readouterr().err  # transformers' own bar, on unless silenced
    load_policy(model_dir)
    load_model_and_tokenizer(ModelConfig(name_or_path=str(model_dir), device="cpu"))
    assert "Loading weights" not in capfd.readouterr().err
    assert transformers_progress_bars_enabled()  # the setting is restored


# ------------------------------------------------------------------ a model name that is not there


@pytest.mark.parametrize("name", ["./tiyn", "tiyn/", "tin y", "tiny--"])
def test_a_mistyped_path_that_is_no_hub_id_fails_at_once_naming_it_and_the_near_directory(model_dir, monkeypatch, name):
    """Not a plausible hub id (a leading ./, a trailing slash, a space, a trailing dash): a missing local
    path, said at once with the directory one typo away, never the hub's repo-id rules."""
    import time

    monkeypatch.chdir(model_dir.parent)  # holds the model directory 'tiny'
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_model_and_tokenizer(ModelConfig(name_or_path=name, device="cpu"))
    assert time.monotonic() - started < 2.0
    message = str(caught.value)
    assert message.startswith(f"model.name_or_path: {name}: no such file or directory (did you mean ")
    assert "tiny'?)" in message and "hub" not in message.lower() and "repo" not in message.lower()


def test_a_hub_id_under_hf_hub_offline_that_is_not_cached_fails_at_once_saying_so(model_dir, monkeypatch):
    import time

    monkeypatch.chdir(model_dir.parent)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_model_and_tokenizer(ModelConfig(name_or_path="no-such-org-xyz/tiyn", device="cpu"))
    assert time.monotonic() - started < 2.0
    assert "no-such-org-xyz/tiyn: no such file or directory, and HF_HUB_OFFLINE is set" in str(caught.value)


LOAD_AND_TIME = """
import sys, time
from dpokit.commands.main import main
import dpokit.training.trainer, transformers  # imports are paid before the clock starts
from transformers import AutoModelForCausalLM, AutoTokenizer
started = time.monotonic()
code = main(["train", sys.argv[1], "model.name_or_path=tiyn", "logging.run_dir=" + sys.argv[2]])
print(f"{code} {time.monotonic() - started:.2f}")
"""


def _train_with_hub_at(endpoint: str, cwd, tmp_path) -> tuple[int, float, str]:
    """``dpokit train`` with a mistyped model name, in a fresh process whose hub is ``endpoint``:
    (exit code, seconds from the command to its end, standard error)."""
    import os
    import subprocess
    import sys

    from tests.helpers import write_preference_jsonl

    data = write_preference_jsonl(tmp_path / "train.jsonl", n=4)
    config = tmp_path / "config.yaml"
    config.write_text(f"model: {{device: cpu}}\ndata: {{train_path: {data}}}\nlogging: {{progress_bar: false}}\n")
    environment = {**os.environ, "HF_ENDPOINT": endpoint}
    environment.pop("HF_HUB_OFFLINE", None)
    environment.pop("TRANSFORMERS_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_TIME, str(config), str(tmp_path / "run")],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    code, seconds = done.stdout.split()[-2:]
    return int(code), float(seconds), done.stderr


@pytest.mark.slow
def test_a_plausible_hub_id_with_the_hub_unreachable_fails_in_one_line_naming_the_cause(model_dir, tmp_path):
    """'tiyn' could be a hub id, so the hub is asked -- once, without the minute of retries -- and the
    error says the hub refused the connection (not that HF_HUB_OFFLINE is set, which it is not)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    code, seconds, err = _train_with_hub_at(f"http://127.0.0.1:{closed_port}", model_dir.parent, tmp_path)
    assert code == 2 and seconds < 2.0, (seconds, err)
    assert err.count("\n") == 1 and err.startswith("error: model.name_or_path: tiyn: no such file or directory"), err
    assert "(did you mean 'tiny'?)" in err and f"127.0.0.1:{closed_port}) cannot be reached" in err
    assert "connection refused" in err and "HF_HUB_OFFLINE" not in err and "Retrying" not in err
    assert not (tmp_path / "run").exists()  # nor is a run directory left behind


def test_a_hub_that_does_not_answer_is_given_up_after_the_etag_timeout(monkeypatch):
    """A server that accepts the connection and never answers (a black-holed proxy, say): the one
    look-up waits HF_HUB_ETAG_TIMEOUT seconds, then says so."""
    import socket
    import time

    from dpokit.models import hub_lookup

    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nothing is ever read or answered
        started = time.monotonic()
        problem = hub_lookup("some-org/tiyn", endpoint=f"http://127.0.0.1:{silent.getsockname()[1]}")
        seconds = time.monotonic() - started
    assert problem is not None and "cannot be reached" in problem and "no answer within 1 s (HF_HUB_ETAG_TIMEOUT)" in problem
    assert 0.9 < seconds < 4.0


def test_checkpoint_blocks_wraps_only_the_last_blocks_and_keeps_the_gradients():
    """checkpoint_blocks(model, 1) on a 3-block Llama turns checkpointing on for the last block alone, and
    the recomputed backward gives the gradients of the plain model."""
    from dpokit.models import checkpoint_blocks, decoder_blocks
    from tests.helpers import tiny_llama

    plain, wrapped = tiny_llama(layers=3), tiny_llama(layers=3)
    assert checkpoint_blocks(wrapped, 1) == 1
    assert [getattr(b, "gradient_checkpointing", False) for b in decoder_blocks(wrapped)] == [False, False, True]
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    for model in (plain, wrapped):
        model.train()
        model(ids, labels=ids).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), wrapped.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
