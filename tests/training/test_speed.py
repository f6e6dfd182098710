"""model.compile: compiled decoder layers give the eager loss and gradients, keep parameter names,
and leave models whose layers cannot be found running eagerly."""

from __future__ import annotations

import os

import pytest
import torch

from dpokit.data import make_collator
from dpokit.logprobs import compute_logps
from dpokit.training.speed import COMPILE_CACHE_ENV, compile_decoder_layers, decoder_layers, use_compile_cache
from tests.helpers import tiny_gpt2, tiny_llama

ITEMS = [
    {"example_id": 0, "prompt_ids": [5, 6, 7, 8], "response_ids": [[21, 22, 23], [31, 32, 33, 34, 35]]},
    {"example_id": 1, "prompt_ids": [11, 12], "response_ids": [[24], [37, 38]]},
]


def summed_logps_and_grads(model):
    out = compute_logps(model, make_collator("shared_prompt", 0)(ITEMS))
    out.logps.sum().backward()
    return out.logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_decoder_layers_are_found_for_llama_and_gpt2():
    assert len(decoder_layers(tiny_llama(vocab_size=64, layers=2))) == 2
    assert len(decoder_layers(tiny_gpt2(vocab_size=64, layers=3))) == 3
    assert compile_decoder_layers(torch.nn.Linear(2, 2)) == 0  # nothing to compile: stays eager


@pytest.mark.slow
def test_compiled_layers_give_the_eager_logps_and_gradients():
    eager_logps, eager_grads = summed_logps_and_grads(tiny_llama(vocab_size=64, layers=1).train())
    model = tiny_llama(vocab_size=64, layers=1).train()
    names = [n for n, _ in model.named_parameters()]
    assert compile_decoder_layers(model) == 1
    logps, grads = summed_logps_and_grads(model)
    assert [n for n, _ in model.named_parameters()] == names  # state_dict keys unchanged
    torch.testing.assert_close(logps, eager_logps, atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4)


def test_compile_cache_goes_to_the_given_directory_unless_the_user_chose_one(monkeypatch, tmp_path):
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    assert use_compile_cache(tmp_path / "a") == str((tmp_path / "a").resolve())
    assert use_compile_cache(tmp_path / "b") == str((tmp_path / "a").resolve())  # set once, kept
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    assert use_compile_cache(tmp_path / "c") == str(tmp_path / "mine")


def test_compile_cache_replaces_the_default_inductor_wrote_into_the_environment(monkeypatch, tmp_path):
    """Importing a transformers model class makes inductor write its default directory into
    TORCHINDUCTOR_CACHE_DIR; that is not the user's choice, so the run's cache directory wins."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    default = cache_dir()  # what inductor does on first use: sets the variable to its default
    assert os.environ[COMPILE_CACHE_ENV] == default
    assert use_compile_cache(tmp_path / "run") == str((tmp_path / "run").resolve())


def test_compile_decoder_layers_points_the_cache_at_the_run_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    assert compile_decoder_layers(torch.nn.Linear(2, 2), cache_dir=tmp_path / "compile") == 0
    assert os.environ[COMPILE_CACHE_ENV] == str((tmp_path / "compile").resolve())
