"""Tests for dpokit.logprobs: the chunked output-layer log-probs equal the naive full-logits path
in value and gradient, on real tiny transformers models (untied, tied, soft-capped, scaled, LoRA)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaForCausalLM,
)

from dpokit.compat import adapters_disabled
from dpokit.data.batch import Batch
from dpokit.errors import TrainingError
from dpokit.logprobs import LOGITS_CHUNK_BYTES, chunked_token_logps, compute_logps, effective_chunk_size, find_output_head
from tests.helpers import tiny_gpt2, tiny_llama

VOCAB = 96


def _padded_batch(examples: list[tuple[list[int], list[list[int]]]], pad_id: int = 0) -> Batch:
    """One right-padded row per scored sequence s = k*B + b (prompt + response k of example b).
    A ranking shorter than K leaves its rows as bare prompts with no scored tokens."""
    num_examples = len(examples)
    num_responses = max(len(responses) for _, responses in examples)
    rows, score_index, score_target, score_seq = [], [], [], []
    lengths = torch.zeros(num_examples, num_responses, dtype=torch.long)
    mask = torch.zeros(num_examples, num_responses, dtype=torch.bool)
    for k in range(num_responses):
        for b, (prompt, responses) in enumerate(examples):
            response = responses[k] if k < len(responses) else []
            rows.append((prompt + response, len(prompt), k * num_examples + b))
            lengths[b, k] = len(response)
            mask[b, k] = k < len(responses)
    width = max(len(ids) for ids, _, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for n, (ids, prompt_length, seq) in enumerate(rows):
        input_ids[n, : len(ids)] = torch.tensor(ids)
        attention_mask[n, : len(ids)] = 1
        for t in range(prompt_length, len(ids)):
            score_index.append(n * width + t - 1)  # position t-1 predicts token t
            score_target.append(ids[t])
            score_seq.append(seq)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        score_index=torch.tensor(score_index),
        score_target=torch.tensor(score_target),
        score_seq=torch.tensor(score_seq),
        response_mask=mask,
        response_lengths=lengths,
    )


def _examples(seed: int = 0, num_examples: int = 3, num_responses: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [(ids(2 + b), [ids(3 + (b + k) % 4) for k in range(num_responses)]) for b in range(num_examples)]


def _naive_sequence_logps(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook path: full float32 logits from the model's own forward, log_softmax, gather."""
    logits = model(**batch.model_inputs(), use_cache=False).logits.float()
    log_probs = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    token_logps = log_probs[batch.score_index, batch.score_target]
    sums = torch.zeros(batch.num_sequences).index_add(0, batch.score_seq, token_logps)
    return sums.view(batch.num_responses, batch.batch_size).t(), token_logps


def _assert_same_value_and_grads(model, batch: Batch, chunk_size: int) -> None:
    weights = torch.randn(batch.batch_size, batch.num_responses)  # a generic downstream loss
    params = [p for p in model.parameters() if p.requires_grad]
    naive, naive_tokens = _naive_sequence_logps(model, batch)
    naive_grads = torch.autograd.grad((naive * weights).sum(), params, allow_unused=True)
    out = compute_logps(model, batch, chunk_size=chunk_size)
    torch.testing.assert_close(out.logps, naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.token_logps, naive_tokens, atol=1e-5, rtol=1e-5)
    chunked_grads = torch.autograd.grad((out.logps * weights).sum(), params, allow_unused=True)
    for param_grad_naive, param_grad_chunked in zip(naive_grads, chunked_grads, strict=True):
        if param_grad_naive is None:
            assert param_grad_chunked is None or param_grad_chunked.abs().max() == 0
            continue
        torch.testing.assert_close(param_grad_chunked, param_grad_naive, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------ the chunked output layer alone


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 37, 4096])
@pytest.mark.parametrize("transform", [{}, {"softcap": 3.0}, {"scale": 0.25}, {"scale": 2.0, "softcap": 5.0}])
def test_chunked_token_logps_equals_full_log_softmax_in_value_and_gradient(chunk_size, transform):
    """37 tokens, vocabulary 50, chunk sizes that do and do not divide M; logits transformed as
    z = c * tanh(a * (h W^T + b) / c) where a model config asks for it."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(37, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=g)
    upstream = torch.randn(37, generator=g)

    logits = (hidden @ weight.t() + bias) * transform.get("scale", 1.0)
    if "softcap" in transform:
        logits = transform["softcap"] * torch.tanh(logits / transform["softcap"])
    naive = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    naive_grads = torch.autograd.grad((naive * upstream).sum(), (hidden, weight, bias))

    chunked = chunked_token_logps(hidden, weight, targets, bias=bias, chunk_size=chunk_size, **transform)
    chunked_grads = torch.autograd.grad((chunked * upstream).sum(), (hidden, weight, bias))
    torch.testing.assert_close(chunked, naive)
    for a, b in zip(chunked_grads, naive_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_chunk_is_capped_in_bytes_so_large_vocabularies_keep_one_chunk_of_logits_small():
    """64 MiB of float32 logits per chunk: 2**26 / (4 V) tokens, so 1,024 stays 1,024 at V = 4,096
    (16 MiB), becomes 2**26 / 2**17 = 512 at V = 32,768 and 2**26 / 2**20 = 64 at V = 262,144; never 0."""
    assert LOGITS_CHUNK_BYTES == 2**26
    assert effective_chunk_size(1024, 4096) == 1024
    assert effective_chunk_size(1024, 32768) == 512
    assert effective_chunk_size(1024, 262144) == 64
    assert effective_chunk_size(1024, 2**40) == 1
    assert effective_chunk_size(7, 262144) == 7


def test_chunked_token_logps_with_a_capped_chunk_still_equals_full_log_softmax():
    """V = 2**21 caps the chunk at 2**26 / 2**23 = 8 tokens; 20 tokens then run as 8 + 8 + 4 and the
    values and gradients are those of the full log-softmax."""
    g = torch.Generator().manual_seed(3)
    vocab = 2**21
    hidden = torch.randn(20, 2, generator=g, requires_grad=True)
    weight = (0.1 * torch.randn(vocab, 2, generator=g)).requires_grad_()
    targets = torch.randint(0, vocab, (20,), generator=g)
    assert effective_chunk_size(1024, vocab) == 8
    naive = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    naive_grad = torch.autograd.grad(naive.sum(), hidden)[0]
    chunked = chunked_token_logps(hidden, weight, targets, chunk_size=1024)
    chunked_grad = torch.autograd.grad(chunked.sum(), hidden)[0]
    torch.testing.assert_close(chunked, naive)
    torch.testing.assert_close(chunked_grad, naive_grad)


def test_chunked_token_logps_passes_gradcheck_in_float64():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (9,), generator=g)
    # float32 logits by design, so compare the float64 function against finite differences loosely.
    fn = lambda h, w, b: chunked_token_logps(h, w, targets, bias=b, chunk_size=4, softcap=4.0, scale=0.5).double()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_chunked_forward_keeps_no_tokens_by_vocabulary_tensor_for_backward():
    """What autograd saves for backward: the naive path keeps an (M, V) tensor; the chunked path keeps
    only its inputs and an (M,) log-partition -- the memory claim, checked exactly."""
    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(1000, 8, requires_grad=True)
    targets = torch.randint(0, 1000, (64,))

    def largest_saved(fn) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return max(sizes)

    naive = largest_saved(lambda: torch.log_softmax(hidden @ weight.t(), -1).gather(1, targets[:, None]))
    chunked = largest_saved(lambda: chunked_token_logps(hidden, weight, targets, chunk_size=16))
    assert naive >= 64 * 1000
    assert chunked == weight.numel()  # the parameter itself; nothing of size M x V


def test_bfloat16_weights_give_float32_log_probs_matching_the_bfloat16_logits_path():
    """Logits are formed in the weight's dtype and raised to float32 (as ``model(...).logits.float()``);
    gradients come back in the parameters' own dtype."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, 16, generator=g).bfloat16().requires_grad_(True)
    weight = torch.randn(40, 16, generator=g).bfloat16().requires_grad_(True)
    targets = torch.randint(0, 40, (20,), generator=g)
    naive = torch.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    chunked = chunked_token_logps(hidden, weight, targets, chunk_size=6)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, naive)
    naive_grads = torch.autograd.grad(naive.sum(), (hidden, weight))
    chunked_grads = torch.autograd.grad(chunked.sum(), (hidden, weight))
    for a, b in zip(chunked_grads, naive_grads, strict=True):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logps(torch.randn(2, 3), torch.randn(5, 3), torch.tensor([0, 1]), chunk_size=0)


# ------------------------------------------------------------------ real models


def _gemma2(softcap: float | None = 0.05):
    """Random-init logits are small (|z| ~ 0.1), so a small cap makes the tanh bite."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        final_logit_softcapping=softcap,
        pad_token_id=0,
    )
    return Gemma2ForCausalLM(config).eval()


def _cohere():
    torch.manual_seed(0)
    config = CohereConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        logit_scale=0.3,
        pad_token_id=0,
    )
    return CohereForCausalLM(config).eval()


def _granite():
    torch.manual_seed(0)
    config = GraniteConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        logits_scaling=4.0,
        pad_token_id=0,
    )
    return GraniteForCausalLM(config).eval()


MODELS = {
    "llama_untied": lambda: tiny_llama(vocab_size=VOCAB),
    "gpt2_tied": lambda: tiny_gpt2(vocab_size=VOCAB),
    "gemma2_softcapped": _gemma2,
    "cohere_logit_scale": _cohere,
    "granite_logits_scaling": _granite,
}


@pytest.mark.parametrize("chunk_size", [5, 1024])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_compute_logps_matches_the_models_own_logits_in_value_and_gradient(arch, chunk_size):
    model = MODELS[arch]()
    _assert_same_value_and_grads(model, _padded_batch(_examples()), chunk_size)


def test_output_head_reads_tied_weights_and_logit_transforms():
    gpt2 = tiny_gpt2(vocab_size=VOCAB)
    assert find_output_head(gpt2).weight is gpt2.transformer.wte.weight
    assert find_output_head(_gemma2(softcap=0.05)).softcap == 0.05
    assert find_output_head(_cohere()).scale == pytest.approx(0.3)
    assert find_output_head(_granite()).scale == pytest.approx(0.25)


def test_softcapping_is_not_a_no_op_on_the_test_model():
    """Guards the Gemma 2 test above: without soft-capping the log-probs would differ."""
    batch = _padded_batch(_examples())
    capped, uncapped = _gemma2(softcap=0.05), _gemma2(softcap=None)
    assert not torch.allclose(compute_logps(capped, batch).logps, compute_logps(uncapped, batch).logps, atol=1e-3)


def test_rankings_of_different_lengths_and_row_order_do_not_change_log_probs():
    """K = 3 with one example ranking only 2 responses: its third slot is 0 with length 0. Scoring
    the same sequences with rows in reverse order (indices remapped) gives identical results."""
    model = tiny_llama(vocab_size=VOCAB)
    examples = _examples(num_responses=3)
    examples[1] = (examples[1][0], examples[1][1][:2])
    batch = _padded_batch(examples)
    out = compute_logps(model, batch)
    assert out.logps[1, 2] == 0 and out.lengths[1, 2] == 0 and not batch.response_mask[1, 2]
    torch.testing.assert_close(out.mean_logps, out.logps / out.lengths.clamp(min=1))

    rows, width = batch.input_ids.shape
    reverse = torch.arange(rows - 1, -1, -1)
    row, column = batch.score_index // width, batch.score_index % width
    reordered = Batch(
        input_ids=batch.input_ids[reverse],
        attention_mask=batch.attention_mask[reverse],
        score_index=(rows - 1 - row) * width + column,
        score_target=batch.score_target,
        score_seq=batch.score_seq,
        response_mask=batch.response_mask,
        response_lengths=batch.response_lengths,
    )
    torch.testing.assert_close(compute_logps(model, reordered).logps, out.logps, atol=1e-5, rtol=1e-5)


def test_lora_adapter_applies_and_disable_adapter_gives_the_base_model():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(vocab_size=VOCAB)
    batch = _padded_batch(_examples())
    with torch.no_grad():
        base_logps = compute_logps(base, batch).logps
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():  # LoRA B starts at zero; give the adapter an effect
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)

    _assert_same_value_and_grads(peft_model, batch, chunk_size=4)
    with torch.no_grad():
        adapted = compute_logps(peft_model, batch).logps
        with adapters_disabled(peft_model):
            disabled = compute_logps(peft_model, batch).logps
            naive_disabled, _ = _naive_sequence_logps(peft_model, batch)
    assert not torch.allclose(adapted, base_logps, atol=1e-3)
    torch.testing.assert_close(disabled, base_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(disabled, naive_disabled, atol=1e-5, rtol=1e-5)


def test_lora_on_the_output_layer_uses_the_module_path_and_stays_exact():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(vocab_size=VOCAB), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    assert find_output_head(peft_model).weight is None
    _assert_same_value_and_grads(peft_model, _padded_batch(_examples()), chunk_size=3)


class _SecretlyScaledLlama(LlamaForCausalLM):
    """A model that changes its logits in forward without saying so in its config."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.logits = outputs.logits * 2.0
        return outputs


def test_unknown_logit_transform_is_detected_instead_of_training_on_wrong_log_probs():
    model = _SecretlyScaledLlama(tiny_llama(vocab_size=VOCAB).config).eval()
    with pytest.raises(TrainingError, match="logits differ"):
        compute_logps(model, _padded_batch(_examples()))


def test_check_runs_without_dropout_and_keeps_each_modules_training_mode():
    model = tiny_gpt2(vocab_size=VOCAB).train()
    model.transformer.h[0].eval()
    compute_logps(model, _padded_batch(_examples()))
    assert model.training and not model.transformer.h[0].training and model.transformer.h[1].training
