"""`dpokit generate`: chat-template-aware, seeded sampling from a saved model directory."""

from __future__ import annotations

import json

import pytest

from dpokit.commands.main import main
from dpokit.analysis.evaluate import load_policy
from dpokit.generation import format_prompt, generate_samples, read_prompts
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
    first = generate_samples(loaded.model, loaded.tokenizer, prompts, max_new_tokens=12, temperature=1.0, num_samples=2, seed=3)
    again = generate_samples(loaded.model, loaded.tokenizer, prompts, max_new_tokens=12, temperature=1.0, num_samples=2, seed=3)
    other = generate_samples(loaded.model, loaded.tokenizer, prompts, max_new_tokens=12, temperature=1.0, num_samples=2, seed=4)
    assert len(first) == 4
    assert [s.completion for s in first] == [s.completion for s in again]
    assert [s.completion for s in first] != [s.completion for s in other]
    assert first[2].prompt_text.endswith("<|im_start|>assistant\n")
    assert all(0 < s.num_tokens <= 12 for s in first)


def test_a_prompts_samples_do_not_depend_on_the_prompts_before_it(model_dir):
    loaded = load_policy(model_dir)
    alone = generate_samples(loaded.model, loaded.tokenizer, ["a good film"], max_new_tokens=8, temperature=1.0, seed=5)
    # Prompt i is seeded with seed + i, so shift the seed with the position.
    second = generate_samples(loaded.model, loaded.tokenizer, ["the plot", "a good film"], max_new_tokens=8, temperature=1.0, seed=4)
    assert alone[0].completion == second[1].completion


def test_greedy_decoding_matches_argmax_of_the_model(model_dir):
    import torch

    loaded = load_policy(model_dir)
    sample = generate_samples(loaded.model, loaded.tokenizer, ["the movie"], max_new_tokens=1, temperature=0)[0]
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
        ["generate", "--model", str(model_dir), "--prompts-file", str(prompts_file), "--num-samples", "2",
         "--max-new-tokens", "6", "--seed", "1", "--output", str(output)]
    )
    assert code == 0
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(row["prompt_index"], row["sample_index"]) for row in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[2]["prompt_text"].startswith("<|im_start|>user\nwhy")
    assert "--- prompt 1, sample 1" in capsys.readouterr().out


def test_read_prompts_names_the_line_of_a_bad_row(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(Exception, match=r"prompts.jsonl:2: field 'prompt'"):
        read_prompts(path)
    text_file = tmp_path / "prompts.txt"
    text_file.write_text("first\n\nsecond\n")
    assert read_prompts(text_file) == ["first", "second"]


def test_top_k_one_sampling_is_greedy_and_top_k_zero_is_unrestricted(model_dir):
    loaded = load_policy(model_dir)
    greedy = generate_samples(loaded.model, loaded.tokenizer, ["the plot"], max_new_tokens=8, temperature=0)
    top_one = generate_samples(loaded.model, loaded.tokenizer, ["the plot"], max_new_tokens=8, temperature=1.0, top_k=1, seed=9)
    assert top_one[0].completion == greedy[0].completion
    # A random model spreads probability widely: unrestricted samples differ from greedy ones.
    free = generate_samples(loaded.model, loaded.tokenizer, ["the plot"], max_new_tokens=8, temperature=1.0, top_k=0, num_samples=4, seed=9)
    assert any(sample.completion != greedy[0].completion for sample in free)
