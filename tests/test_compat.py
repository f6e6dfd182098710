"""dpokit.compat against the installed transformers / peft / tokenizers / datasets: each function's
behaviour pinned on real objects (tiny models, a real LoRA, a trained tokenizer, a real Dataset), and
the installed versions checked to be the ones the module was checked against. When an upgrade
breaks one of these, this file says which internal moved."""

from __future__ import annotations

import json
import re

import datasets
import peft
import pytest
import torch
import torch.nn as nn
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from transformers import CohereConfig, FalconH1Config, Gemma2Config, Gemma3Config, GraniteConfig, LlamaConfig, PretrainedConfig

from dpokit import compat
from dpokit.compat import LibraryCompatibilityError
from dpokit.errors import DpokitError
from tests.helpers import preference_rows, tiny_gpt2, tiny_llama, tiny_tokenizer


class _WithConfig(nn.Module):
    """A module carrying only a config (what the config readers look at)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config


def _lora(model: nn.Module, **options) -> nn.Module:
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **options))


# ---------------------------------------------------------------------------------------------- versions


@pytest.mark.parametrize("library", sorted(compat.CHECKED_VERSIONS))
def test_installed_version_is_one_the_module_was_checked_against(library):
    checked = compat.CHECKED_VERSIONS[library]
    installed = compat.installed_version(library)
    assert installed.startswith(checked.rstrip("x")), (
        f"{library} {installed} is installed but dpokit.compat was checked against {checked}: run tests/test_compat.py, "
        "re-check each function's docstring against the new version, then update CHECKED_VERSIONS"
    )


def test_every_library_of_the_module_is_a_checked_one():
    assert set(compat.CHECKED_VERSIONS) == {"transformers", "peft", "tokenizers", "datasets"}


def test_an_incompatibility_names_the_library_its_version_and_what_to_do():
    with pytest.raises(LibraryCompatibilityError) as caught:
        compat.dataset_fingerprint(object())
    message = str(caught.value)
    assert message.startswith(f"datasets {datasets.__version__}: object has no `_fingerprint` string")
    assert "checked against datasets 5.x" in message and "pip install 'datasets==5.*'" in message
    assert isinstance(caught.value, DpokitError)  # printed without a stack trace by the command line


# ---------------------------------------------------------------------------------------------- transformers


def test_attention_implementation_reads_the_loaded_models_config():
    assert compat.attention_implementation(tiny_llama(attn_implementation="eager")) == "eager"
    assert compat.attention_implementation(tiny_llama(attn_implementation="sdpa")) == "sdpa"
    assert compat.attention_implementation(tiny_gpt2()) == tiny_gpt2().config._attn_implementation


def test_attention_implementation_defaults_to_eager_without_a_setting_or_a_config():
    assert LlamaConfig()._attn_implementation is None
    assert compat.attention_implementation(_WithConfig(LlamaConfig())) == "eager"
    assert compat.attention_implementation(nn.Linear(2, 2)) == "eager"


def test_attention_implementation_of_a_multimodal_config_is_its_text_configs():
    config = Gemma3Config()
    config.get_text_config()._attn_implementation = "sdpa"
    model = _WithConfig(config)
    assert compat.text_config(model) is config.text_config
    assert compat.attention_implementation(model) == "sdpa"
    assert compat.text_config(nn.Linear(2, 2)) is None


def test_a_transformers_config_without_attn_implementation_is_a_compatibility_error(monkeypatch):
    model = _WithConfig(LlamaConfig())  # built first: without the property, __init__ would set a plain attribute
    monkeypatch.delattr(PretrainedConfig, "_attn_implementation")
    with pytest.raises(LibraryCompatibilityError, match=r"transformers .*: model configs no longer have `_attn_implementation`"):
        compat.attention_implementation(model)


def test_no_split_module_class_names_are_the_transformer_blocks():
    assert compat.no_split_module_class_names(tiny_llama()) == {"LlamaDecoderLayer"}
    assert compat.no_split_module_class_names(tiny_gpt2()) == {"GPT2Block"}
    assert compat.no_split_module_class_names(_lora(tiny_llama())) == {"LlamaDecoderLayer"}  # through peft
    assert compat.no_split_module_class_names(nn.Sequential(nn.Linear(2, 2))) == set()


def test_a_no_split_declaration_that_is_not_a_list_of_names_is_a_compatibility_error():
    model = nn.Sequential(nn.Linear(2, 2))
    model._no_split_modules = "LlamaDecoderLayer"
    with pytest.raises(LibraryCompatibilityError, match="_no_split_modules is not a list of class names"):
        compat.no_split_module_class_names(model)


def test_architecture_config_dict_leaves_out_the_path_version_cache_and_dtype():
    config = tiny_llama().config
    config._name_or_path = "/somewhere/on/disk"
    full = config.to_dict()
    assert full["_name_or_path"] == "/somewhere/on/disk" and "transformers_version" in full  # the keys it drops
    kept = compat.architecture_config_dict(config)
    assert {key: value for key, value in full.items() if key not in kept} == {
        key: full[key] for key in ("_name_or_path", "transformers_version", "use_cache", "dtype") if key in full
    }
    config._name_or_path = "/elsewhere"
    config.use_cache = not config.use_cache
    assert compat.architecture_config_dict(config) == kept


@pytest.mark.parametrize(
    "config, scale, softcap",
    [
        (LlamaConfig(), 1.0, None),
        (CohereConfig(logit_scale=0.3), 0.3, None),
        (GraniteConfig(logits_scaling=4.0), 0.25, None),
        (FalconH1Config(lm_head_multiplier=0.5), 0.5, None),
        (Gemma2Config(final_logit_softcapping=30.0), 1.0, 30.0),
        (Gemma2Config(final_logit_softcapping=None), 1.0, None),
        (Gemma3Config().text_config, 1.0, None),
    ],
    ids=["llama", "cohere", "granite", "falcon_h1", "gemma2", "gemma2_uncapped", "gemma3"],
)
def test_logit_transform_table_reads_each_architectures_config(config, scale, softcap):
    assert compat.logit_scale(config) == pytest.approx(scale)
    assert compat.final_logit_softcap(config) == softcap


def test_the_config_attributes_the_logit_table_reads_still_exist_with_their_defaults():
    """A rename in transformers would make the table fall back to 1.0 silently (then the once-per-model
    check in compute_logps fails); this names the attribute instead."""
    assert CohereConfig().logit_scale == pytest.approx(0.0625)
    assert GraniteConfig().logits_scaling == 1.0
    assert FalconH1Config().lm_head_multiplier == 1.0
    assert Gemma2Config().final_logit_softcapping == 30.0


def test_transformers_progress_bars_switch_off_and_on():
    was = compat.transformers_progress_bars_enabled()
    try:
        compat.set_transformers_progress_bars(False)
        assert compat.transformers_progress_bars_enabled() is False
        compat.set_transformers_progress_bars(True)
        assert compat.transformers_progress_bars_enabled() is True
    finally:
        compat.set_transformers_progress_bars(was)


# ---------------------------------------------------------------------------------------------- peft


def test_peft_base_parameter_names_of_a_real_lora_model_are_the_plain_models_names():
    plain_names = {name for name, _ in tiny_llama().named_parameters()}
    wrapped = _lora(tiny_llama())
    names = [name for name, _ in wrapped.named_parameters()]
    assert any(".base_layer." in name for name in names) and all(name.startswith("base_model.model.") for name in names)
    mapped = {name: compat.peft_base_parameter_name(name) for name in names}
    assert {name for name, plain in mapped.items() if plain is None} == {name for name in names if ".lora_" in name}
    assert {plain for plain in mapped.values() if plain is not None} == plain_names


def test_peft_base_parameter_name_examples():
    name = compat.peft_base_parameter_name
    assert name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert name("base_model.model.lm_head.modules_to_save.default.weight") is None
    assert name("model.embed_tokens.weight") == "model.embed_tokens.weight"  # a plain model's names are unchanged


def test_modules_to_save_copies_are_adapter_weights():
    wrapped = _lora(tiny_llama(), modules_to_save=["lm_head"])
    copies = [name for name, _ in wrapped.named_parameters() if "modules_to_save" in name]
    assert copies and all(compat.peft_base_parameter_name(name) is None for name in copies)


def test_adapters_disabled_computes_as_the_base_model():
    base = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        wrapped = _lora(base, init_lora_weights=False)  # random B: the adapters change the output
        assert not torch.allclose(wrapped(input_ids=ids).logits, expected)
        with compat.adapters_disabled(wrapped) as same:
            assert same is wrapped
            torch.testing.assert_close(wrapped(input_ids=ids).logits, expected)
        assert not torch.allclose(wrapped(input_ids=ids).logits, expected)  # back on after the block


def test_adapters_disabled_on_a_model_without_adapters_is_a_compatibility_error():
    with (
        pytest.raises(LibraryCompatibilityError, match=r"peft .*: LlamaForCausalLM has no disable_adapter\(\)"),
        compat.adapters_disabled(tiny_llama()),
    ):
        pass


# ---------------------------------------------------------------------------------------------- tokenizers


def test_tokenizer_backend_of_a_fast_tokenizer_is_its_rust_tokenizer():
    tokenizer = tiny_tokenizer()
    backend = compat.tokenizer_backend(tokenizer)
    assert isinstance(backend, Tokenizer)
    assert backend.encode("the movie was good", add_special_tokens=False).ids == tokenizer("the movie was good")["input_ids"]


def test_tokenizer_backend_is_none_for_tokenizers_that_are_not_fast_and_an_error_for_fast_ones_without_it():
    class Slow:
        is_fast = False

    class FastWithoutBackend:
        is_fast = True

    assert tiny_tokenizer().is_fast is True
    assert compat.tokenizer_backend(Slow()) is None
    with pytest.raises(LibraryCompatibilityError, match="fast tokenizer FastWithoutBackend has no `backend_tokenizer`"):
        compat.tokenizer_backend(FastWithoutBackend())


def test_serialized_tokenizer_is_the_whole_pipeline_and_rebuilds_the_same_tokenizer():
    backend = compat.tokenizer_backend(tiny_tokenizer())
    text = compat.serialized_tokenizer(backend)
    assert {"added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model"} <= set(json.loads(text))
    rebuilt = Tokenizer.from_str(text)
    sample = "tell me why the movie was good <|im_end|>"
    assert rebuilt.encode(sample).ids == backend.encode(sample).ids
    assert compat.serialized_tokenizer(rebuilt) == text  # stable: it keys the tokenized-data cache
    with pytest.raises(LibraryCompatibilityError, match="tokenizers .*: object has no to_str"):
        compat.serialized_tokenizer(object())


def test_component_state_of_the_trained_tokenizers_pre_tokenizer():
    backend = compat.tokenizer_backend(tiny_tokenizer())
    assert compat.tokenizer_component_state(backend.pre_tokenizer) == {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    assert backend.normalizer is None and compat.tokenizer_component_state(backend.normalizer) is None


def test_component_state_of_sequences_and_splits():
    split = pre_tokenizers.Split(pattern=r" ?\p{L}+", behavior="isolated", invert=False)
    state = compat.tokenizer_component_state(pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(use_regex=False)]))
    assert state["type"] == "Sequence"
    first, second = state["pretokenizers"]
    assert first["type"] == "Split" and first["behavior"] == "Isolated" and first["invert"] is False
    assert first["pattern"] == {"String": r" ?\p{L}+"}  # a str pattern; tokenizers.Regex gives {"Regex": ...}
    assert second["type"] == "ByteLevel" and second["use_regex"] is False
    regex_split = pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(r"\s+"), behavior="isolated")
    assert compat.tokenizer_component_state(regex_split)["pattern"] == {"Regex": r"\s+"}
    normalizer = compat.tokenizer_component_state(normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()]))
    assert normalizer == {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}


def test_component_state_that_is_not_json_is_a_compatibility_error():
    class Opaque:
        def __getstate__(self):
            return b"\x80\x04binary"

    with pytest.raises(LibraryCompatibilityError, match=r"tokenizers .*: the state of Opaque is no longer JSON"):
        compat.tokenizer_component_state(Opaque())


# ---------------------------------------------------------------------------------------------- datasets


def test_dataset_fingerprint_follows_the_data_and_its_transforms():
    rows = preference_rows(6, seed=1)
    dataset = datasets.Dataset.from_list(rows)
    fingerprint = compat.dataset_fingerprint(dataset)
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint)
    assert compat.dataset_fingerprint(datasets.Dataset.from_list(rows)) == fingerprint  # same data, same fingerprint
    assert compat.dataset_fingerprint(datasets.Dataset.from_list(preference_rows(6, seed=2))) != fingerprint
    mapped = dataset.map(lambda row: {"prompt": row["prompt"].upper()})
    assert compat.dataset_fingerprint(mapped) != fingerprint


def test_kv_cache_keyword_is_the_name_the_installed_transformers_returns_the_cache_under():
    """A causal LM's forward output carries its KV cache under exactly this name."""
    from dpokit.compat import kv_cache_keyword
    from tests.helpers import tiny_llama

    model = tiny_llama()
    out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
    assert kv_cache_keyword() in ("cache", "past_key_values")
    assert getattr(out, kv_cache_keyword()) is not None


def test_inductor_default_cache_dir_is_where_inductor_goes_without_the_variable(monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from dpokit.compat import inductor_default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert cache_dir() == inductor_default_cache_dir()
