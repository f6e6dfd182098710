"""The sampling interface without a server: the dpokit engine is the generator, unchanged; engine
settings are checked before anything runs."""

from __future__ import annotations

import pytest

from dpokit.config import load_config
from dpokit.errors import ConfigError
from dpokit.generation import SamplingConfig, build_engine, encode_prompts, generate, stop_token_ids
from dpokit.generation.engines import engine_logp_gap
from dpokit.models import pad_id_of
from tests.helpers import tiny_llama, tiny_tokenizer


def test_the_dpokit_engine_returns_exactly_what_the_generator_samples():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    _, ids = encode_prompts(tokenizer, ["the movie was", [{"role": "user", "content": "tell me why"}]])
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=50, num_samples=3, seed=11)
    engine = build_engine("dpokit", model=model, tokenizer=tokenizer, batch_size=4)
    sampled = engine.sample(ids, sampling)
    expected = generate(model, ids, sampling, stop_token_ids=stop_token_ids(tokenizer), pad_token_id=pad_id_of(tokenizer))
    assert [(c.prompt_index, c.sample_index, c.token_ids, c.stopped) for c in sampled] == [
        (c.prompt_index, c.sample_index, c.token_ids, c.stopped) for c in expected
    ]
    assert [c.text for c in sampled] == tokenizer.batch_decode([c.content_ids for c in expected], skip_special_tokens=True)
    assert all(c.token_logprobs is None for c in sampled)  # this engine reports none, so no gap is measured
    assert engine_logp_gap(sampled, [0.0] * len(sampled)) is None and engine.sample([], sampling) == []


def test_engine_settings_are_checked_before_anything_runs():
    with pytest.raises(ConfigError, match=r"online.sampling.engine=vllm needs online.sampling.url"):
        load_config(None, ["online.sampling.engine=vllm"])
    with pytest.raises(ConfigError, match="online.sampling.engine"):
        load_config(None, ["online.sampling.engine=sglang"])
    with pytest.raises(ConfigError, match="unknown sampling engine 'sglang'"):
        build_engine("sglang")
    with pytest.raises(ConfigError, match="must be an http"):
        build_engine("vllm", url="127.0.0.1:8000")
    with pytest.raises(ConfigError, match="needs a model and its tokenizer"):
        build_engine("dpokit")
