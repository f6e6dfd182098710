"""Token ids: the exact prompt/response boundary for plain text and two chat-template shapes, EOS once,
BOS never twice, and the truncation rules."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from dpokit.data import PreferenceExample, PrepareOptions, prepare_from_examples, tokenize_examples
from dpokit.data.tokenize import truncate
from dpokit.errors import DataError
from tests.helpers import CHATML_TEMPLATE, LLAMA2_TEMPLATE, tiny_tokenizer

USER = {"role": "user", "content": "tell me a good story"}
SYSTEM = {"role": "system", "content": "you are funny"}
GOOD = {"role": "assistant", "content": "the movie was great"}
BAD = {"role": "assistant", "content": "boring"}


def bos_adding_tokenizer() -> PreTrainedTokenizerFast:
    """Like Llama's: the tokenizer itself puts <|bos|> before every text."""
    base = tiny_tokenizer()
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", base.bos_token_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")
    tokenizer.chat_template = LLAMA2_TEMPLATE
    return tokenizer


def tokenize(examples, tokenizer, **kwargs):
    columns, kept, report = tokenize_examples(examples, tokenizer, max_length=None, max_prompt_length=None, **kwargs)
    return [columns.example(i) for i in range(len(columns))], report


# ---------------------------------------------------------------- plain text


def test_plain_text_prompt_and_response_are_tokenized_separately_with_one_eos():
    tokenizer = tiny_tokenizer()
    [(prompt, responses)], _ = tokenize([PreferenceExample("tell me a story.", [" it was great", " boring"])], tokenizer)
    assert prompt == tokenizer("tell me a story.", add_special_tokens=False)["input_ids"]
    assert responses[0] == tokenizer(" it was great", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert responses[1][-1] == tokenizer.eos_token_id and responses[1].count(tokenizer.eos_token_id) == 1


def test_eos_is_not_doubled_when_the_response_already_ends_with_it():
    tokenizer = tiny_tokenizer()
    [(_, responses)], _ = tokenize([PreferenceExample("q.", [" yes<|eos|>", " no"])], tokenizer)
    assert responses[0].count(tokenizer.eos_token_id) == 1 and responses[0][-1] == tokenizer.eos_token_id


def test_tokenizer_bos_is_kept_on_the_prompt_once_and_never_on_responses():
    tokenizer = bos_adding_tokenizer()
    bos = tokenizer.bos_token_id
    examples = [
        PreferenceExample("tell me a story.", [" great", " bad"]),
        PreferenceExample("<|bos|>tell me a story.", [" great", " bad"]),
    ]
    [(prompt_a, responses), (prompt_b, _)], _ = tokenize(examples, tokenizer)
    assert prompt_a[0] == bos and prompt_a.count(bos) == 1
    assert prompt_b == prompt_a  # text that already starts with BOS does not get a second one
    assert all(bos not in r for r in responses)


# ---------------------------------------------------------------- chat templates


@pytest.mark.parametrize(
    "template, response_text",
    [
        (CHATML_TEMPLATE, "the movie was great<|im_end|>\n"),  # markers around turns, no BOS
        (LLAMA2_TEMPLATE, " the movie was great<|eos|>"),  # BOS in the template, EOS after the answer
    ],
)
def test_chat_boundary_matches_apply_chat_template_for_two_template_shapes(template, response_text):
    tokenizer = tiny_tokenizer(chat_template=template)
    prompt_messages = [SYSTEM, USER] if template == CHATML_TEMPLATE else [USER]
    [(prompt, responses)], _ = tokenize([PreferenceExample(prompt_messages, [[GOOD], [BAD]])], tokenizer)
    expected_prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    expected_full = tokenizer.apply_chat_template(prompt_messages + [GOOD], tokenize=True, return_dict=True)["input_ids"]
    assert prompt == expected_prompt
    assert prompt + responses[0] == expected_full
    assert tokenizer.decode(responses[0]) == response_text
    assert (prompt + responses[0]).count(tokenizer.bos_token_id) == (1 if template == LLAMA2_TEMPLATE else 0)


def test_chat_with_bos_adding_tokenizer_does_not_add_a_second_bos():
    tokenizer = bos_adding_tokenizer()  # tokenizer adds BOS *and* the template writes {{ bos_token }}
    [(prompt, responses)], _ = tokenize([PreferenceExample([USER], [[GOOD], [BAD]])], tokenizer)
    assert prompt[0] == tokenizer.bos_token_id and (prompt + responses[0]).count(tokenizer.bos_token_id) == 1


def test_multi_turn_response_is_everything_after_the_generation_prompt():
    tokenizer = tiny_tokenizer()
    follow_up = {"role": "user", "content": "why"}
    [(prompt, responses)], _ = tokenize([PreferenceExample([USER], [[GOOD, follow_up, BAD], [BAD]])], tokenizer)
    assert tokenizer.decode(responses[0]) == (
        "the movie was great<|im_end|>\n<|im_start|>user\nwhy<|im_end|>\n<|im_start|>assistant\nboring<|im_end|>\n"
    )


PREFIX_BREAKING = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def test_template_whose_prompt_is_not_a_prefix_raises_naming_the_row():
    tokenizer = tiny_tokenizer(chat_template=PREFIX_BREAKING)
    examples = [PreferenceExample([USER], [[GOOD], [BAD]], source="chat.jsonl:line 4")]
    with pytest.raises(DataError, match=r"chat.jsonl:line 4: the chat template renders the prompt .* differently"):
        tokenize(examples, tokenizer)


def test_template_prefix_failures_are_counted_when_skipping():
    tokenizer = tiny_tokenizer(chat_template=PREFIX_BREAKING)
    examples = [PreferenceExample([USER], [[GOOD], [BAD]], source="chat.jsonl:line 4"), PreferenceExample("plain.", [" a", " b"])]
    kept, report = tokenize(examples, tokenizer, skip_invalid=True)
    assert len(kept) == 1 and report.skipped == {"chat_template_prefix": 1}
    assert "chat.jsonl:line 4" in report.summary()


# ---------------------------------------------------------------- truncation rules

PROMPT = list(range(100, 110))  # 10 tokens, BOS-less
RESPONSES = [list(range(200, 206)), list(range(300, 304))]  # 6 and 4 tokens


def test_nothing_is_cut_when_prompt_plus_longest_response_fits():
    assert truncate(PROMPT, RESPONSES, max_length=16, max_prompt_length=3, truncation_mode="keep_end") == (
        PROMPT,
        RESPONSES,
        None,
    )


def test_keep_end_cuts_the_prompt_from_the_left_first():
    """10 + 6 > 15: the prompt is cut to its last 8 tokens; 8 + 6 = 14 fits, responses untouched."""
    prompt, responses, what = truncate(PROMPT, RESPONSES, max_length=15, max_prompt_length=8, truncation_mode="keep_end")
    assert prompt == PROMPT[2:] and responses == RESPONSES and what == "prompt"


def test_keep_start_keeps_the_first_prompt_tokens():
    prompt, _, _ = truncate(PROMPT, RESPONSES, max_length=15, max_prompt_length=8, truncation_mode="keep_start")
    assert prompt == PROMPT[:8]


def test_keep_end_keeps_a_leading_bos():
    prompt, _, _ = truncate([1] + PROMPT, RESPONSES, max_length=15, max_prompt_length=8, truncation_mode="keep_end", keep_first=1)
    assert prompt == [1] + PROMPT[-7:]


def test_responses_are_cut_after_the_prompt_to_fill_max_length():
    """Prompt 10 -> 8, then room = 12 - 8 = 4: the 6-token response keeps its first 4 tokens."""
    prompt, responses, what = truncate(PROMPT, RESPONSES, max_length=12, max_prompt_length=8, truncation_mode="keep_end")
    assert prompt == PROMPT[2:] and responses == [RESPONSES[0][:4], RESPONSES[1]] and what == "both"


def test_example_is_dropped_when_the_prompt_leaves_no_room():
    assert truncate(PROMPT, RESPONSES, max_length=10, max_prompt_length=None, truncation_mode="keep_end")[2] == "drop"


def test_truncation_counts_are_reported_end_to_end():
    tokenizer = tiny_tokenizer()
    long_prompt = " ".join(["tell me a good story"] * 20) + "."
    examples = [
        PreferenceExample("short.", [" good", " bad"]),
        PreferenceExample(long_prompt, [" good", " bad"]),
        PreferenceExample("short.", [" the movie was great " * 20, " bad"]),
    ]
    dataset = prepare_from_examples(examples, tokenizer, PrepareOptions(max_length=24, max_prompt_length=12))
    report = dataset.report.tokenize
    assert (report.prompt_truncated, report.responses_truncated) == (1, 1)
    assert all(len(item["prompt_ids"]) + max(map(len, item["response_ids"])) <= 24 for item in dataset.items)
    assert len(dataset.items[1]["prompt_ids"]) == 12
    dropped = prepare_from_examples(examples, tokenizer, PrepareOptions(max_length=24, max_prompt_length=None))
    assert len(dropped) == 2 and dropped.report.tokenize.dropped == {"prompt_fills_max_length": 1}
    assert "dropped 1" in dropped.report.summary()


def test_mixed_text_and_chat_examples_keep_input_order_through_truncation_and_drops():
    """Plain-text and conversational examples are tokenized on separate paths and truncated in place;
    the kept examples come back in input order, each equal to tokenizing it on its own."""
    tokenizer = tiny_tokenizer()
    long_text = " ".join(["tell me a good story"] * 30) + "."
    examples = [
        PreferenceExample([USER], [[GOOD], [BAD]]),
        PreferenceExample("short.", [" good", " bad"]),
        PreferenceExample(long_text, [" good", " bad"]),  # dropped: the prompt fills max_length
        PreferenceExample([SYSTEM, USER], [[GOOD], [BAD]]),
        PreferenceExample("short.", [" the movie was great " * 20, " bad"]),  # responses cut
    ]
    settings = dict(max_length=40, max_prompt_length=None, truncation_mode="keep_end")
    columns, kept, report = tokenize_examples(examples, tokenizer, **settings)
    assert kept == [0, 1, 3, 4] and report.dropped == {"prompt_fills_max_length": 1}
    cut = 0
    for row, index in enumerate(kept):
        alone, _, alone_report = tokenize_examples([examples[index]], tokenizer, **settings)
        assert columns.example(row) == alone.example(0)
        cut += alone_report.responses_truncated
    assert report.responses_truncated == cut >= 1


# ---------------------------------------------------------------- truncated responses


def test_a_truncated_response_gets_no_eos_while_a_complete_one_gets_exactly_one():
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    example = PreferenceExample("tell me a story.", [" it was great", " it was cut"], truncated=[False, True])
    [(_, (complete, cut))], _ = tokenize([example], tokenizer)
    assert complete == tokenizer(" it was great", add_special_tokens=False)["input_ids"] + [eos]
    assert cut == tokenizer(" it was cut", add_special_tokens=False)["input_ids"] and eos not in cut


def test_a_truncated_chat_response_ends_with_its_content_not_the_end_of_turn_marker():
    tokenizer = tiny_tokenizer(chat_template=CHATML_TEMPLATE)
    [(prompt, (complete, cut))], _ = tokenize([PreferenceExample([USER], [[GOOD], [BAD]], truncated=[False, True])], tokenizer)
    assert tokenizer.decode(complete) == "the movie was great<|im_end|>\n"
    assert cut == tokenizer("boring", add_special_tokens=False)["input_ids"]
    assert (
        prompt == tokenizer.apply_chat_template([USER], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    )


def test_a_truncated_chat_response_of_several_messages_is_refused_naming_the_row():
    tokenizer = tiny_tokenizer(chat_template=CHATML_TEMPLATE)
    follow_up = {"role": "user", "content": "why"}
    examples = [
        PreferenceExample([USER], [[GOOD, follow_up, BAD], [BAD]], source="d.jsonl:line 3", truncated=[True, False]),
        PreferenceExample([USER], [[GOOD], [BAD]], source="d.jsonl:line 4", truncated=[False, True]),
    ]
    with pytest.raises(DataError, match=r"d.jsonl:line 3: response 0 is marked truncated but has 3 messages"):
        tokenize(examples, tokenizer)
    kept, report = tokenize(examples, tokenizer, skip_invalid=True)
    assert len(kept) == 1 and report.skipped["wrong_type"] == 1
    assert kept[0][1][1] == tokenizer("boring", add_special_tokens=False)["input_ids"]


def test_truncation_flags_survive_ranking_expansion_and_the_cache(tmp_path):
    import json

    from dpokit.data import prepare_dataset

    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    row = {"prompt": "tell me a story.", "responses": [" good", " fine", " cut off"], "scores": [3, 2, 1]}
    path = tmp_path / "rows.jsonl"

    def prepared(truncated):
        path.write_text(json.dumps({**row, "truncated": truncated}) + "\n", encoding="utf-8")
        dataset = prepare_dataset(
            path,
            tokenizer,
            PrepareOptions(ranked_mode="all_pairs", max_length=None, max_prompt_length=None),
            cache_dir=tmp_path / "cache",
        )
        return dataset, [dataset.columns.example(i)[1] for i in range(len(dataset))]

    cold, pairs = prepared([False, False, True])
    assert [[r[-1] == eos for r in pair] for pair in pairs] == [[True, True], [True, False], [True, False]]
    warm, cached = prepared([False, False, True])
    assert warm.from_cache and cached == pairs
    flipped, other = prepared([False, False, False])  # the flag is part of the data: another cache entry
    assert not flipped.from_cache and flipped.fingerprint != cold.fingerprint
    assert all(r[-1] == eos for pair in other for r in pair)
