"""dpokit.generation: the batched generator (left padding, KV cache, seeding, stop tokens, teacher-forced
log-probs) and `dpokit generate` (chat-template-aware, seeded sampling from a saved model directory)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dpokit.commands.main import main
from dpokit.generation import SamplingConfig, format_prompt, generate_samples
from dpokit.models import load_policy
from tests.helpers import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved the way a trained model is, so the real loading path runs."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def test_chat_prompts_go_through_the_chat_template_with_the_generation_prompt():
    tokenizer = tiny_tokenizer()
    text = format_prompt(tokenizer, [{"role": "user", "content": "tell me about the movie"}])
    assert text == "<|im_start|>user\ntell me about the movie<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt(tokenizer, "the movie was") == "the movie was"
    assert format_prompt(tokenizer, "hi", chat_template="always", system="be brief") == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_same_seed_gives_the_same_samples_and_another_seed_differs(model_dir):
    loaded = load_policy(model_dir)
    prompts = ["the movie was", [{"role": "user", "content": "tell me about the plot"}]]
    first = generate_samples(
        loaded.model, loaded.tokenizer, prompts, SamplingConfig(max_new_tokens=12, temperature=1.0, num_samples=2, seed=3)
    )
    again = generate_samples(
        loaded.model, loaded.tokenizer, prompts, SamplingConfig(max_new_tokens=12, temperature=1.0, num_samples=2, seed=3)
    )
    other = generate_samples(
        loaded.model, loaded.tokenizer, prompts, SamplingConfig(max_new_tokens=12, temperature=1.0, num_samples=2, seed=4)
    )
    assert len(first) == 4
    assert [s.completion for s in first] == [s.completion for s in again]
    assert [s.completion for s in first] != [s.completion for s in other]
    assert first[2].prompt_text.endswith("<|im_start|>assistant\n")
    assert all(0 < s.num_tokens <= 12 for s in first)


def test_a_prompts_samples_do_not_depend_on_the_prompts_before_it(model_dir):
    loaded = load_policy(model_dir)
    alone = generate_samples(
        loaded.model, loaded.tokenizer, ["a good film"], SamplingConfig(max_new_tokens=8, temperature=1.0, seed=5)
    )
    # Prompt i is seeded with seed + i, so shift the seed with the position.
    second = generate_samples(
        loaded.model, loaded.tokenizer, ["the plot", "a good film"], SamplingConfig(max_new_tokens=8, temperature=1.0, seed=4)
    )
    assert alone[0].completion == second[1].completion


def test_greedy_decoding_matches_argmax_of_the_model(model_dir):
    import torch

    loaded = load_policy(model_dir)
    sample = generate_samples(loaded.model, loaded.tokenizer, ["the movie"], SamplingConfig(max_new_tokens=1, temperature=0))[0]
    ids = loaded.tokenizer("the movie")["input_ids"]
    with torch.no_grad():
        next_id = int(loaded.model(torch.tensor([ids])).logits[0, -1].argmax())
    stops = {loaded.tokenizer.eos_token_id, loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    expected = "" if next_id in stops else loaded.tokenizer.decode([next_id], skip_special_tokens=True)
    assert sample.completion == expected


def test_cli_writes_jsonl_samples_from_a_prompts_file(model_dir, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(
        json.dumps({"prompt": "the film"}) + "\n" + json.dumps({"prompt": [{"role": "user", "content": "why"}]}) + "\n"
    )
    output = tmp_path / "samples.jsonl"
    code = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--prompts-file",
            str(prompts_file),
            "--num-samples",
            "2",
            "--max-new-tokens",
            "6",
            "--seed",
            "1",
            "--output",
            str(output),
        ]
    )
    assert code == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(row["prompt_index"], row["sample_index"]) for row in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[2]["prompt_text"].startswith("<|im_start|>user\nwhy")
    assert "--- prompt 1, sample 1" in capsys.readouterr().out


def test_top_k_one_sampling_is_greedy_and_top_k_zero_is_unrestricted(model_dir):
    loaded = load_policy(model_dir)
    greedy = generate_samples(loaded.model, loaded.tokenizer, ["the plot"], SamplingConfig(max_new_tokens=8, temperature=0))
    top_one = generate_samples(
        loaded.model, loaded.tokenizer, ["the plot"], SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1, seed=9)
    )
    assert top_one[0].completion == greedy[0].completion
    # A random model spreads probability widely: unrestricted samples differ from greedy ones.
    free = generate_samples(
        loaded.model,
        loaded.tokenizer,
        ["the plot"],
        SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=0, num_samples=4, seed=9),
    )
    assert any(sample.completion != greedy[0].completion for sample in free)


# ------------------------------------------------------------------------------- the batched generator

import contextlib  # noqa: E402
import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

from dpokit.generation import (  # noqa: E402
    completion_logps,
    encode_prompts,
    generate,
    policy_and_reference_samples,
    stop_token_ids,
)
from dpokit.generation.sampler import _truncated  # noqa: E402
from tests.helpers import LLAMA2_TEMPLATE, tiny_gpt2  # noqa: E402

PROMPTS = ["a", "the movie was very good and", "i liked it", "tell me why the plot is so long and boring"]


class Counter(torch.nn.Module):
    """A hand-built "language model" without a KV cache: after token v it puts (almost) all mass on v + 1."""

    def __init__(self, vocab_size: int = 16) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        logits = 20.0 * torch.nn.functional.one_hot((input_ids + 1) % self.vocab_size, self.vocab_size).float()
        return SimpleNamespace(logits=logits)


def _prompt_ids(tokenizer):
    return encode_prompts(tokenizer, PROMPTS)[1]


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_batched_left_padded_greedy_equals_one_prompt_at_a_time_and_hf_generate(build):
    tokenizer = tiny_tokenizer()
    model = build(vocab_size=len(tokenizer))
    ids = _prompt_ids(tokenizer)
    greedy = SamplingConfig(max_new_tokens=10, temperature=0)
    kwargs = dict(stop_token_ids=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    batched = generate(model, ids, greedy, batch_size=len(ids), **kwargs)
    alone = [generate(model, [row], greedy, batch_size=1, **kwargs)[0] for row in ids]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    # transformers' own greedy search over the unpadded prompt gives the same tokens.
    for row, completion in zip(ids, batched, strict=True):
        output = model.generate(
            torch.tensor([row]),
            attention_mask=torch.ones(1, len(row), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=kwargs["stop_token_ids"],
            pad_token_id=tokenizer.pad_token_id,
        )
        expected = output[0, len(row) :].tolist()
        assert completion.token_ids == expected[: len(completion.token_ids)]


def test_sampled_rows_do_not_depend_on_batch_size_or_neighbours():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer))
    ids = _prompt_ids(tokenizer)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=3, seed=11)
    kwargs = dict(stop_token_ids=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    one_batch = generate(model, ids, sampling, batch_size=64, **kwargs)
    row_by_row = generate(model, ids, sampling, batch_size=1, **kwargs)
    assert [c.token_ids for c in one_batch] == [c.token_ids for c in row_by_row]
    assert [(c.prompt_index, c.sample_index) for c in one_batch] == [(p, s) for p in range(4) for s in range(3)]
    assert len({tuple(c.token_ids) for c in one_batch[:3]}) > 1  # a prompt's samples differ from each other
    # Prompt i is seeded with seed + i: the last prompt alone, at seed + 3, gets the same samples.
    last_alone = generate(model, ids[3:], dataclasses.replace(sampling, seed=14), **kwargs)
    assert [c.token_ids for c in last_alone] == [c.token_ids for c in one_batch[9:]]


def test_returned_log_probs_equal_teacher_forcing_and_the_sampler():
    """policy_logp is completion_logps of the same rows; at temperature 1 the sampler's own running
    sum (KV-cached, left-padded) agrees with it too."""
    tokenizer = tiny_tokenizer()
    model = tiny_gpt2(vocab_size=len(tokenizer), seed=3)
    ids = _prompt_ids(tokenizer)
    completions = generate(
        model,
        ids,
        SamplingConfig(max_new_tokens=7, temperature=1.0, num_samples=2, seed=0),
        stop_token_ids=stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        score=True,
    )
    forced = completion_logps(
        model, [ids[c.prompt_index] for c in completions], [c.token_ids for c in completions], pad_token_id=tokenizer.pad_token_id
    )
    assert [c.policy_logp for c in completions] == forced.tolist()
    assert all(c.reference_logp is None for c in completions)
    for completion in completions:
        assert completion.sampling_logp == pytest.approx(completion.policy_logp, abs=1e-4)
        alone = completion_logps(model, [ids[completion.prompt_index]], [completion.token_ids], pad_token_id=0)
        assert alone.item() == pytest.approx(completion.policy_logp, abs=1e-4)


def test_reference_log_probs_equal_policy_log_probs_when_the_reference_is_the_policy():
    tokenizer = tiny_tokenizer()
    policy = tiny_llama(vocab_size=len(tokenizer), seed=1)
    other = tiny_llama(vocab_size=len(tokenizer), seed=2)
    ids = _prompt_ids(tokenizer)
    kwargs = dict(stop_token_ids=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=2)
    same = generate(policy, ids, sampling, reference=policy, **kwargs)
    assert all(c.policy_logp == c.reference_logp for c in same)  # KL term exactly 0
    different = generate(policy, ids, sampling, reference=other, **kwargs)
    assert [c.token_ids for c in different] == [c.token_ids for c in same]  # the reference does not sample
    expected = completion_logps(
        other, [ids[c.prompt_index] for c in different], [c.token_ids for c in different], pad_token_id=tokenizer.pad_token_id
    )
    assert [c.reference_logp for c in different] == expected.tolist()
    assert any(c.reference_logp != c.policy_logp for c in different)


def test_rows_stop_at_their_first_stop_token_and_keep_it():
    """Counter continues v -> v+1; with stop token 6 each row stops there, whatever the others do."""
    rows = [[3], [5], [0, 1]]
    completions = generate(Counter(), rows, SamplingConfig(max_new_tokens=4, temperature=0), stop_token_ids=[6], pad_token_id=0)
    assert [c.token_ids for c in completions] == [[4, 5, 6], [6], [2, 3, 4, 5]]
    assert [c.stopped for c in completions] == [True, True, False]
    assert [c.content_ids for c in completions] == [[4, 5], [], [2, 3, 4, 5]]
    # Sampling from a near-one-hot distribution takes the same path.
    sampled = generate(Counter(), rows, SamplingConfig(max_new_tokens=4, temperature=1.0), stop_token_ids=[6], pad_token_id=0)
    assert [c.token_ids for c in sampled] == [c.token_ids for c in completions]


def test_stop_tokens_include_the_chat_end_of_turn_marker():
    tokenizer = tiny_tokenizer()
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_chat_prompts_are_tokenized_without_a_second_bos():
    chatml = tiny_tokenizer()
    texts, ids = encode_prompts(chatml, [[{"role": "user", "content": "hi"}], "plain text"])
    assert texts[0].endswith("<|im_start|>assistant\n")
    assert ids[0] == chatml(texts[0], add_special_tokens=False)["input_ids"]
    assert ids[1] == chatml("plain text")["input_ids"]
    llama2 = tiny_tokenizer(chat_template=LLAMA2_TEMPLATE)
    _, (row,) = encode_prompts(llama2, [[{"role": "user", "content": "hi"}]])
    assert row[0] == llama2.bos_token_id and row.count(llama2.bos_token_id) == 1


def test_top_k_and_top_p_keep_the_likeliest_tokens():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    kept = lambda **kw: torch.isfinite(_truncated(logits, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=0, top_p=1.0) == [True, True, True]
    assert kept(top_k=2, top_p=1.0) == [True, True, False]
    assert kept(top_k=0, top_p=0.5) == [True, False, False]  # 0.5 already reaches 0.5
    assert kept(top_k=0, top_p=0.6) == [True, True, False]
    with pytest.raises(Exception, match="top_p"):
        SamplingConfig(top_p=0).validate()


def test_trainer_samples_come_from_policy_and_reference_and_restore_train_mode():
    tokenizer = tiny_tokenizer()
    policy = tiny_llama(vocab_size=len(tokenizer), seed=1).train()
    reference_model = tiny_llama(vocab_size=len(tokenizer), seed=2)

    class Reference:
        def __init__(self, model):
            self.model = model

        @contextlib.contextmanager
        def sampling_model(self):
            yield self.model

    ids = _prompt_ids(tokenizer)
    samples = policy_and_reference_samples(policy, Reference(reference_model), tokenizer, ids, max_new_tokens=5)
    assert policy.training
    expected = generate_samples(policy, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=5, temperature=0))
    assert [s["policy"] for s in samples] == [e.completion for e in expected]
    assert [s["prompt"] for s in samples] == [tokenizer.decode(row) for row in ids]
    assert all("reference" in s for s in samples)
    assert "reference" not in policy_and_reference_samples(policy, Reference(None), tokenizer, ids[:1], max_new_tokens=2)[0]
