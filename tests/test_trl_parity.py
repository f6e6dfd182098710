"""Same math as TRL 1.16: on the same first batch, dpokit's per-sequence log-probs and sigmoid DPO
loss equal those of TRL's ``DPOTrainer`` (its own tokenization, collator and loss code), in every
batch layout."""

from __future__ import annotations

import warnings

import pytest
import torch

from dpokit.data import PrepareOptions, make_collator, prepare_from_examples
from dpokit.data.schema import PreferenceExample
from dpokit.logprobs import compute_logps
from dpokit.losses import LossInputs, build_objective
from tests.helpers import preference_rows, tiny_llama, tiny_tokenizer, trl_dpo_config

trl = pytest.importorskip("trl")

BETA = 0.1
NUM_PAIRS = 4


@pytest.fixture(scope="module")
def trl_reference_values(tmp_path_factory):
    """TRL's per-example chosen/rejected log-probs (one ``_compute_loss`` call per example, read
    from its logged metrics) and its loss on the whole first batch."""
    from datasets import Dataset

    rows = preference_rows(NUM_PAIRS, seed=3)
    tokenizer = tiny_tokenizer()
    args = trl_dpo_config(str(tmp_path_factory.mktemp("trl")), beta=BETA, batch_size=NUM_PAIRS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(
            model=tiny_llama(seed=0),
            ref_model=tiny_llama(seed=1),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    examples = [trainer.train_dataset[i] for i in range(NUM_PAIRS)]
    trainer.model.train()
    chosen, rejected = [], []
    with torch.no_grad():
        for example in examples:
            trainer._metrics["train"].clear()
            trainer._compute_loss(trainer.model, trainer.data_collator([example]), return_outputs=False)
            chosen.append(trainer._metrics["train"]["logps/chosen"][0])
            rejected.append(trainer._metrics["train"]["logps/rejected"][0])
        loss = trainer._compute_loss(trainer.model, trainer.data_collator(examples), return_outputs=False).item()
    token_ids = [(e["prompt_ids"], [e["chosen_ids"], e["rejected_ids"]]) for e in examples]
    return rows, tokenizer, torch.tensor([chosen, rejected]).t(), loss, token_ids


@pytest.mark.parametrize("layout", ["padded", "shared_prompt", "packed"])
def test_sequence_logps_and_sigmoid_loss_equal_trl(trl_reference_values, layout):
    rows, tokenizer, trl_logps, trl_loss, trl_token_ids = trl_reference_values
    examples = [
        PreferenceExample(prompt=r["prompt"], responses=[r["chosen"], r["rejected"]], source=f"row {i}")
        for i, r in enumerate(rows)
    ]
    items = prepare_from_examples(examples, tokenizer, PrepareOptions(max_length=None, max_prompt_length=None)).items
    # The same token ids go in (TRL: prompt, then each response + EOS).
    assert [(item["prompt_ids"], item["response_ids"]) for item in items] == trl_token_ids

    batch = make_collator(layout, tokenizer.pad_token_id, **({"pack_tokens": 64} if layout == "packed" else {}))(list(items))
    policy, reference = tiny_llama(seed=0).train(), tiny_llama(seed=1)
    with torch.no_grad():
        policy_logps = compute_logps(policy, batch).logps
        reference_logps = compute_logps(reference, batch).logps
    torch.testing.assert_close(policy_logps, trl_logps, atol=1e-4, rtol=0)
    objective = build_objective([{"name": "sigmoid"}], beta=BETA)
    loss = objective(LossInputs(policy_logps, reference_logps, batch.response_lengths, batch.response_mask)).loss
    assert loss.item() == pytest.approx(trl_loss, abs=1e-4)
