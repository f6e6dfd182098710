"""Tests for dpokit.losses: oracle values from TRL 1.16, hand-worked examples, gradients, registry."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpokit import losses as L
from dpokit.errors import ConfigError, DataError

# In-repository copy (see tests/oracles/README.md; scripts/regenerate_trl_oracles.py rebuilds it from TRL).
ORACLE_PATH = Path(__file__).resolve().parent / "oracles" / "trl_1.16_losses_seed0.json"

# TRL parameter names -> dpokit parameter names (only those a given loss takes are passed on).
_TRL_PARAM_NAMES = {
    "label_smoothing": "label_smoothing",
    "f_divergence_type": "f_divergence",
    "f_alpha_divergence_coef": "f_alpha",
    "discopop_tau": "tau",
}


def _load_oracle() -> dict:
    if not ORACLE_PATH.exists():  # part of the repository: a missing oracle is an error, not a skip
        raise FileNotFoundError(f"TRL oracle file not found at {ORACLE_PATH}; run scripts/regenerate_trl_oracles.py")
    return json.loads(ORACLE_PATH.read_text())


ORACLE = _load_oracle()
ORACLE_CASES = {case["name"]: case for case in ORACLE["results"]}


def _oracle_inputs(dtype=torch.float64) -> L.LossInputs:
    raw = ORACLE["inputs"]
    t = lambda key: torch.tensor(raw[key], dtype=dtype)  # noqa: E731
    policy = torch.stack([t("policy_chosen_logps"), t("policy_rejected_logps")], dim=1)
    reference = torch.stack([t("ref_chosen_logps"), t("ref_rejected_logps")], dim=1)
    lengths = torch.stack([torch.tensor(raw["chosen_lengths"]), torch.tensor(raw["rejected_lengths"])], dim=1)
    return L.LossInputs(policy, reference, lengths, torch.ones_like(lengths, dtype=torch.bool))


def _terms_for(case: dict) -> list[dict]:
    loss_types = case["loss_type"] if isinstance(case["loss_type"], list) else [case["loss_type"]]
    weights = case.get("loss_weights") or [1.0] * len(loss_types)
    terms = []
    for loss_type, weight in zip(loss_types, weights, strict=True):
        takes = L.LOSSES[loss_type].params
        term = {"name": loss_type, "weight": weight}
        for trl_name, ours in _TRL_PARAM_NAMES.items():
            if ours in takes and trl_name in case and case[trl_name] != takes[ours]:
                term[ours] = case[trl_name]
        terms.append(term)
    return terms


def test_oracle_has_26_cases_and_every_loss_type_is_registered():
    assert len(ORACLE_CASES) == 26 and not ORACLE.get("failed")
    trl_types = {t for c in ORACLE["results"] for t in (c["loss_type"] if isinstance(c["loss_type"], list) else [c["loss_type"]])}
    assert trl_types <= set(L.available_losses())


@pytest.mark.parametrize("name", sorted(ORACLE_CASES))
def test_loss_matches_trl_oracle(name):
    """Each TRL 1.16 case reproduced from the same float32 inputs, in float64.

    Where the definitions coincide the per-example losses agree to 1e-6. Documented exceptions:
    * ``sft``: TRL repeats the batch token-mean NLL for every example; dpokit gives each example its
      share (-pi_w / mean length), so only the batch mean (the training loss) must agree, and it does.
    * weighted combinations: the oracle keeps only the mean.
    * ``alpha_divergence``: TRL refuses float64 there, so its numbers are float32 (tolerance 1e-5).
    """
    case = ORACLE_CASES[name]
    objective = L.build_objective(_terms_for(case), beta=case["beta"])
    out = objective(_oracle_inputs())
    tolerance = 1e-5 if case["compute_dtype"] == "float32" else 1e-6
    assert out.loss.item() == pytest.approx(case["mean_loss"], abs=tolerance)
    per_example_kept = case.get("losses") is not None and None not in case["losses"]
    if per_example_kept and case["loss_type"] != "sft":
        torch.testing.assert_close(out.per_example, torch.tensor(case["losses"], dtype=torch.float64), atol=tolerance, rtol=0)
    if case["loss_type"] == "sft":
        batch_tokens = _oracle_inputs().lengths[:, 0].sum()
        expected = -_oracle_inputs().policy_logps[:, 0] * len(case["losses"]) / batch_tokens
        torch.testing.assert_close(out.per_example, expected)
    if case.get("chosen_rewards") is not None:
        torch.testing.assert_close(
            out.metrics["rewards/chosen"], torch.tensor(case["chosen_rewards"], dtype=torch.float64), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            out.metrics["rewards/rejected"], torch.tensor(case["rejected_rewards"], dtype=torch.float64), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("name", ["ipo", "ipo|beta=0.5"])
def test_ipo_on_summed_log_ratios_is_trl_ipo_with_unit_lengths(name):
    """dpokit's ``ipo`` defaults to TRL's length-averaged form (the IPO authors' reported setting).
    ``length_normalize=False`` is the DPO reference code's IPO on *summed* log-ratios; it equals
    (h - 1/(2 beta))^2 with h = rho_w - rho_l, and TRL's value is recovered by dividing each
    log-ratio by its length first -- checked against the oracle's numbers both ways."""
    case = ORACLE_CASES[name]
    inputs = _oracle_inputs()
    beta = case["beta"]
    rho = inputs.policy_logps - inputs.reference_logps
    summed = L.build_objective([{"name": "ipo", "length_normalize": False}], beta=beta)(inputs).per_example
    torch.testing.assert_close(summed, (rho[:, 0] - rho[:, 1] - 1 / (2 * beta)) ** 2)
    averaged_rho = rho / inputs.lengths
    trl = torch.tensor(case["losses"], dtype=torch.float64)
    torch.testing.assert_close((averaged_rho[:, 0] - averaged_rho[:, 1] - 1 / (2 * beta)) ** 2, trl, atol=1e-6, rtol=0)


def test_oracle_file_is_what_the_installed_trl_computes():
    """scripts/regenerate_trl_oracles.py, run against the installed TRL 1.16, rebuilds the in-repo
    oracle to 1e-9 (so the numbers above are TRL's, not a stale copy)."""
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"the oracle is TRL 1.16.0's; installed {trl.__version__}")
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "scripts" / "regenerate_trl_oracles.py"
    spec = importlib.util.spec_from_file_location("regenerate_trl_oracles", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rebuilt = module.build_dpo_oracle(ORACLE["inputs"], ORACLE["seed"])
    assert module.compare(rebuilt, ORACLE) == []


# ------------------------------------------------------------------ hand-worked examples


def _pair(chosen: float, rejected: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([chosen], dtype=torch.float64), torch.tensor([rejected], dtype=torch.float64)


def test_sigmoid_hand_worked():
    """log-ratios rho_w = 1.0, rho_l = -1.0, beta 0.5:
    margin = 0.5 * (1 - (-1)) = 1.0; loss = -log sigma(1) = log(1 + e^-1) = 0.313262."""
    loss = L.sigmoid_loss(*_pair(1.0, -1.0), beta=0.5)
    assert loss.item() == pytest.approx(0.3132617, abs=1e-7)


def test_conservative_dpo_hand_worked():
    """Same pair, label_smoothing eps = 0.1:
    -(0.9) log sigma(1) - 0.1 log sigma(-1) = 0.9 * 0.313262 + 0.1 * 1.313262 = 0.413262
    (log sigma(-1) = log sigma(1) - 1, so the smoothing adds exactly eps * margin here)."""
    loss = L.sigmoid_loss(*_pair(1.0, -1.0), beta=0.5, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.4132617, abs=1e-7)


def test_ipo_hand_worked():
    """rho_w = 1.0, rho_l = -1.0, beta 0.5, so the target margin 1/(2 beta) = 1.
    Summed: h = 2, loss = (2 - 1)^2 = 1.
    Length-normalised with |y_w| = 2, |y_l| = 4: h = 0.5 + 0.25 = 0.75, loss = (0.75 - 1)^2 = 0.0625."""
    lengths_w, lengths_l = torch.tensor([2]), torch.tensor([4])
    summed = L.ipo_loss(*_pair(1.0, -1.0), lengths_w, lengths_l, beta=0.5, length_normalize=False)
    averaged = L.ipo_loss(*_pair(1.0, -1.0), lengths_w, lengths_l, beta=0.5)
    assert summed.item() == pytest.approx(1.0)
    assert averaged.item() == pytest.approx(0.0625)


def test_plackett_luce_hand_worked_three_responses():
    """Log-ratios (1, 0, -1) ranked best first, beta 1, so rewards r = (1, 0, -1):
    step 1: r_1 - log(e^1 + e^0 + e^-1) = 1 - 1.407606 = -0.407606
    step 2: r_2 - log(e^0 + e^-1)       = 0 - 0.313262 = -0.313262
    step 3: r_3 - log(e^-1)             = 0
    loss = 0.407606 + 0.313262 = 0.720868."""
    logratios = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    loss = L.plackett_luce_loss(logratios, torch.ones(1, 3, dtype=torch.bool), beta=1.0)
    assert loss.item() == pytest.approx(0.7208677, abs=1e-7)


def test_plackett_luce_with_two_responses_equals_sigmoid():
    """K = 2: -(r_w - log(e^r_w + e^r_l)) = log(1 + e^-(r_w - r_l)) = -log sigma(r_w - r_l)."""
    logratios = torch.randn(32, 2, dtype=torch.float64) * 5
    pl = L.plackett_luce_loss(logratios, torch.ones(32, 2, dtype=torch.bool), beta=0.3)
    dpo = L.sigmoid_loss(logratios[:, 0], logratios[:, 1], beta=0.3)
    torch.testing.assert_close(pl, dpo, atol=1e-12, rtol=0)
    inputs = L.LossInputs(logratios, torch.zeros_like(logratios), torch.ones(32, 2), torch.ones(32, 2, dtype=torch.bool))
    torch.testing.assert_close(
        L.build_objective([{"name": "plackett_luce"}], beta=0.3)(inputs).loss,
        L.build_objective([{"name": "sigmoid"}], beta=0.3)(inputs).loss,
        atol=1e-12,
        rtol=0,
    )


def test_plackett_luce_mask_ignores_missing_responses_and_their_values():
    """A batch with K = 4 slots: example 0 ranks 4 responses, example 1 only 2 (slots 2-3 padded).
    Example 1's loss is its pairwise DPO loss; whatever sits in padded slots (even NaN) changes
    neither the loss nor any gradient."""
    logratios = torch.randn(2, 4, dtype=torch.float64)
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    garbage = logratios.clone()
    garbage[1, 2:] = float("nan")
    garbage.requires_grad_(True)
    loss = L.plackett_luce_loss(garbage, mask, beta=0.5)
    loss.sum().backward()
    assert torch.isfinite(garbage.grad).all() and (garbage.grad[1, 2:] == 0).all()
    torch.testing.assert_close(loss[1], L.sigmoid_loss(logratios[1, :1], logratios[1, 1:2], beta=0.5)[0])
    full = L.plackett_luce_loss(logratios[:1], mask[:1], beta=0.5)
    torch.testing.assert_close(loss[0], full[0])


def test_plackett_luce_prefers_the_stated_ranking():
    """The loss is smallest when rewards are sorted the way the ranking says."""
    mask = torch.ones(1, 3, dtype=torch.bool)
    right = L.plackett_luce_loss(torch.tensor([[2.0, 0.0, -2.0]]), mask, beta=1.0)
    wrong = L.plackett_luce_loss(torch.tensor([[-2.0, 0.0, 2.0]]), mask, beta=1.0)
    assert right.item() < wrong.item()


def test_robust_at_zero_smoothing_is_dpo_and_is_unbiased_for_flipped_labels():
    """Chowdhury et al.: E over label flips with rate eps of the robust loss equals the clean DPO loss:
    (1 - eps) * robust(h) + eps * robust(-h) = -log sigma(beta h)."""
    w, l = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    torch.testing.assert_close(L.robust_loss(w, l, beta=0.2), L.sigmoid_loss(w, l, beta=0.2))
    eps = 0.2
    expected_over_flips = (1 - eps) * L.robust_loss(w, l, beta=0.2, label_smoothing=eps) + eps * L.robust_loss(
        l, w, beta=0.2, label_smoothing=eps
    )
    torch.testing.assert_close(expected_over_flips, L.sigmoid_loss(w, l, beta=0.2))


def test_unlikelihood_hand_worked():
    """One example: chosen summed log-prob -2 over 2 tokens, one rejected token with p = 0.5, alpha 1:
    loss = 2 / 2 + (-log(1 - 0.5)) / 1 = 1 + 0.693147 = 1.693147."""
    loss = L.unlikelihood_loss(
        torch.tensor([-2.0], dtype=torch.float64),
        torch.tensor([2]),
        torch.tensor([math.log(0.5)], dtype=torch.float64),
        torch.tensor([0]),
    )
    assert loss.item() == pytest.approx(1.6931472)


def test_unlikelihood_is_finite_when_a_rejected_token_is_certain():
    """p -> 1 would make -log(1 - p) infinite; the floor 1 - p >= 1e-5 caps it at 11.51 with finite grads."""
    token_logps = torch.tensor([0.0, -1e-12, -30.0], dtype=torch.float64, requires_grad=True)
    loss = L.unlikelihood_loss(torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1]), token_logps, torch.tensor([0, 0, 0]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(token_logps.grad).all()
    assert loss.item() == pytest.approx(1.0 + (2 * -math.log(1e-5) - math.log1p(-math.exp(-30.0))) / 3, rel=1e-6)


def test_unlikelihood_term_reads_rejected_tokens_of_every_lower_ranked_response():
    """Batch B = 2, K = 3: tokens of sequences s = k*B + b with k >= 1 are 'rejected' for example b."""
    B = 2
    token_seq = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5])  # s=0,1 chosen; 2,3 rank 1; 4,5 rank 2
    token_logps = torch.log(torch.tensor([0.9, 0.8, 0.7, 0.5, 0.4, 0.2, 0.1, 0.3], dtype=torch.float64))
    policy = torch.zeros(B, 3, dtype=torch.float64)
    policy.index_put_((token_seq % B, token_seq // B), token_logps, accumulate=True)
    lengths = torch.tensor([[2, 1, 1], [1, 1, 2]])
    inputs = L.LossInputs(policy, None, lengths, torch.ones(B, 3, dtype=torch.bool), token_logps, token_seq)
    out = L.build_objective([{"name": "unlikelihood", "alpha": 0.5}], beta=0.1)(inputs)
    # rejected tokens: example 0 -> p 0.5 (s=2), 0.2 (s=4); example 1 -> p 0.4 (s=3), 0.1, 0.3 (s=5); mean count 2.5
    unl = (
        torch.tensor([-math.log(0.5) - math.log(0.8), -math.log(0.6) - math.log(0.9) - math.log(0.7)], dtype=torch.float64) / 2.5
    )
    nll = -policy[:, 0] / 1.5
    torch.testing.assert_close(out.per_example, nll + 0.5 * unl)


# ------------------------------------------------------------------ gradients


def _gradcheck_inputs(batch: int = 6):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(batch, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    l = (torch.randn(batch, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    return w, l


_LENGTHS = (torch.tensor([3, 5, 2, 7, 4, 1]), torch.tensor([4, 2, 6, 3, 5, 2]))
_AOT_REFERENCE = (torch.tensor([-1.0, 0.5, 2.0, -3.0, 0.1, 1.2], dtype=torch.float64), torch.zeros(6, dtype=torch.float64))
_GRADCHECK_CALLS = {
    "sigmoid": lambda w, l: L.sigmoid_loss(w, l, beta=0.3, label_smoothing=0.1),
    "sigmoid_forward_kl": lambda w, l: L.sigmoid_loss(w, l, beta=0.3, f_divergence="forward_kl"),
    "sigmoid_js": lambda w, l: L.sigmoid_loss(w, l, beta=0.3, f_divergence="js_divergence"),
    "sigmoid_alpha": lambda w, l: L.sigmoid_loss(w, l, beta=0.3, f_divergence="alpha_divergence", f_alpha=0.5),
    "robust": lambda w, l: L.robust_loss(w, l, beta=0.3, label_smoothing=0.2),
    "ipo": lambda w, l: L.ipo_loss(w, l, *_LENGTHS, beta=0.3),
    "ipo_summed": lambda w, l: L.ipo_loss(w, l, *_LENGTHS, beta=0.3, length_normalize=False),
    "hinge": lambda w, l: L.hinge_loss(w, l, beta=0.3),
    "exo_pair": lambda w, l: L.exo_pair_loss(w, l, beta=0.3, label_smoothing=0.01),
    "nca_pair": lambda w, l: L.nca_pair_loss(w, l, beta=0.3),
    "bco_pair": lambda w, l: L.bco_pair_loss(w, l, beta=0.3),
    "sppo_hard": lambda w, l: L.sppo_hard_loss(w, l, beta=0.3),
    "apo_zero": lambda w, l: L.apo_zero_loss(w, l, beta=0.3),
    "apo_down": lambda w, l: L.apo_down_loss(w, l, beta=0.3),
    "discopop": lambda w, l: L.discopop_loss(w, l, beta=0.3, tau=0.05),
    "aot": lambda w, l: L.aot_loss(w, l, _AOT_REFERENCE[0], _AOT_REFERENCE[1], beta=0.3, label_smoothing=0.1),
    "aot_unpaired": lambda w, l: L.aot_unpaired_loss(w, l, beta=0.3, label_smoothing=0.1),
    "sigmoid_norm": lambda w, l: L.sigmoid_norm_loss(w, l, *_LENGTHS, beta=0.3),
    "sft": lambda w, l: L.sft_loss(w, _LENGTHS[0]),
    "unlikelihood": lambda w, l: L.unlikelihood_loss(
        w, _LENGTHS[0], -torch.nn.functional.softplus(l), torch.arange(6), alpha=0.5
    ),
    "plackett_luce": lambda w, l: L.plackett_luce_loss(
        torch.stack([w, l, 0.5 * l - 1.0], dim=1), torch.tensor([[True, True, True]] * 3 + [[True, True, False]] * 3), beta=0.3
    ),
}


def test_every_registered_loss_has_a_gradient_check():
    from tests.test_losses_unpaired import GRADCHECK_CALLS as UNPAIRED_AND_REFERENCE_FREE

    covered = {name.split("_forward")[0].split("_js")[0].split("_alpha")[0].removesuffix("_summed") for name in _GRADCHECK_CALLS}
    assert set(L.available_losses()) <= covered | set(UNPAIRED_AND_REFERENCE_FREE)


@pytest.mark.parametrize("name", sorted(_GRADCHECK_CALLS))
def test_loss_gradient_matches_finite_differences(name):
    """torch.autograd.gradcheck in float64 (hinge's kink and aot's sort ties are avoided by the inputs)."""
    w, l = _gradcheck_inputs()
    assert torch.autograd.gradcheck(_GRADCHECK_CALLS[name], (w, l), eps=1e-6, atol=1e-5)


def test_sigmoid_gradient_weights_examples_by_how_wrong_the_implicit_reward_is():
    """DPO paper, appendix A.4: d loss / d rho_w = -beta * sigma(r_l - r_w) and d loss / d rho_l = +beta *
    sigma(r_l - r_w), with r = beta * rho. E.g. rho_w = 1, rho_l = -1, beta 0.5: weight sigma(-1) = 0.268941."""
    beta = 0.5
    w, l = _gradcheck_inputs(batch=32)
    L.sigmoid_loss(w, l, beta=beta).sum().backward()
    weight = torch.sigmoid(beta * l.detach() - beta * w.detach())
    torch.testing.assert_close(w.grad, -beta * weight)
    torch.testing.assert_close(l.grad, beta * weight)
    w1, l1 = (x.requires_grad_(True) for x in _pair(1.0, -1.0))
    L.sigmoid_loss(w1, l1, beta=beta).backward()
    assert w1.grad.item() == pytest.approx(-0.5 * 0.2689414, abs=1e-7)


# ------------------------------------------------------------------ objective, registry, metrics


def _random_inputs(batch=8, k=2, seed=0, dtype=torch.float64) -> L.LossInputs:
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(batch, k, generator=g, dtype=dtype) * 50
    reference = policy + torch.randn(batch, k, generator=g, dtype=dtype)
    lengths = torch.randint(1, 30, (batch, k), generator=g)
    return L.LossInputs(policy, reference, lengths, torch.ones(batch, k, dtype=torch.bool))


def test_weighted_sum_of_terms_is_the_weighted_sum_of_each_loss():
    inputs = _random_inputs()
    combined = L.build_objective(
        [{"name": "sigmoid", "weight": 0.8}, {"name": "bco_pair", "weight": 0.2}, {"name": "sft"}], beta=0.1
    )(inputs)
    parts = [L.build_objective([{"name": n}], beta=0.1)(inputs).per_example for n in ("sigmoid", "bco_pair", "sft")]
    torch.testing.assert_close(combined.per_example, 0.8 * parts[0] + 0.2 * parts[1] + parts[2])
    torch.testing.assert_close(combined.loss, combined.per_example.mean())
    assert set(combined.metrics) >= {"loss/sigmoid", "loss/bco_pair", "loss/sft"}


def test_metrics_for_a_pair():
    """policy (-10, -20), reference (-12, -18), beta 0.5: rewards chosen 0.5*2 = 1, rejected 0.5*(-2) = -1,
    margin 2, accuracy 1, preference probability sigma(2) = 0.880797."""
    inputs = L.LossInputs(
        torch.tensor([[-10.0, -20.0]]), torch.tensor([[-12.0, -18.0]]), torch.tensor([[5, 5]]), torch.tensor([[True, True]])
    )
    m = L.build_objective([{"name": "sigmoid"}], beta=0.5)(inputs).metrics
    expected = {
        "rewards/chosen": 1.0,
        "rewards/rejected": -1.0,
        "rewards/accuracies": 1.0,
        "rewards/margins": 2.0,
        "logps/chosen": -10.0,
        "logps/rejected": -20.0,
        "preference_prob": 0.8807971,
    }
    for key, value in expected.items():
        assert m[key].shape == (1,) and m[key].item() == pytest.approx(value, abs=1e-6), key


def test_metrics_for_rankings_of_different_lengths():
    """Rejected = the worst present response; accuracy = share of correctly ordered pairs.
    Example 0 rewards (3, 1, 2): pairs (0>1 ok, 0>2 ok, 1>2 wrong) -> 2/3. Example 1 has 2 responses (1, 2): 0/1."""
    policy = torch.tensor([[3.0, 1.0, 2.0], [1.0, 2.0, 99.0]])
    inputs = L.LossInputs(policy, torch.zeros_like(policy), torch.ones(2, 3), torch.tensor([[True] * 3, [True, True, False]]))
    m = L.build_objective([{"name": "plackett_luce"}], beta=1.0)(inputs).metrics
    torch.testing.assert_close(m["rewards/rejected"], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(m["rewards/accuracies"], torch.tensor([2 / 3, 0.0]))
    torch.testing.assert_close(m["rewards/margins"], torch.tensor([1.0, -1.0]))


def test_reference_free_treats_reference_logps_as_zero():
    inputs = _random_inputs()
    free = L.build_objective([{"name": "sigmoid"}], beta=0.1, reference_free=True)
    assert not free.needs_reference
    zeros = L.LossInputs(inputs.policy_logps, torch.zeros_like(inputs.policy_logps), inputs.lengths, inputs.response_mask)
    torch.testing.assert_close(free(inputs).per_example, L.build_objective([{"name": "sigmoid"}], beta=0.1)(zeros).per_example)
    no_reference = L.LossInputs(inputs.policy_logps, None, inputs.lengths, inputs.response_mask)
    torch.testing.assert_close(free(no_reference).loss, free(inputs).loss)


def test_needs_reference_only_when_some_term_compares_to_the_reference():
    assert L.build_objective([{"name": "sigmoid"}, {"name": "sft"}], beta=0.1).needs_reference
    assert not L.build_objective([{"name": "sft"}, {"name": "unlikelihood"}], beta=0.1).needs_reference
    with pytest.raises(ConfigError, match="reference"):
        L.build_objective([{"name": "ipo"}], beta=0.1)(
            L.LossInputs(torch.zeros(2, 2), None, torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool))
        )


def test_unknown_loss_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown loss 'dpo'.*sigmoid.*plackett_luce"):
        L.build_objective([{"name": "dpo"}], beta=0.1)


def test_parameter_the_loss_does_not_take_lists_the_ones_it_does():
    with pytest.raises(ConfigError, match="'hinge' does not take label_smoothing"):
        L.build_objective([{"name": "hinge", "label_smoothing": 0.1}], beta=0.1)
    with pytest.raises(ConfigError, match="takes: label_smoothing .*f_divergence"):
        L.build_objective([{"name": "sigmoid", "tau": 0.1}], beta=0.1)


@pytest.mark.parametrize(
    "term, message",
    [
        ({"name": "robust", "label_smoothing": 0.5}, r"must be in \[0.0, 0.5\)"),
        ({"name": "exo_pair", "label_smoothing": 0.0}, r"must be in \(0.0, 1.0\)"),
        ({"name": "sigmoid", "f_divergence": "kl"}, "must be one of reverse_kl"),
        ({"name": "ipo", "length_normalize": "yes"}, "expected true/false"),
        ({"name": "discopop", "tau": 0}, "must be > 0"),
        ({"name": "sigmoid", "weight": "heavy"}, "weight must be a finite number"),
    ],
)
def test_out_of_range_parameters_are_config_errors(term, message):
    with pytest.raises(ConfigError, match=message):
        L.build_objective([term], beta=0.1)


def test_beta_must_be_positive():
    with pytest.raises(ConfigError, match="beta"):
        L.build_objective([{"name": "sigmoid"}], beta=0.0)


def test_pairwise_loss_on_rankings_of_three_asks_for_plackett_luce_or_pairs():
    inputs = _random_inputs(k=3)
    with pytest.raises(ConfigError, match="plackett_luce.*pairs"):
        L.build_objective([{"name": "sigmoid"}], beta=0.1)(inputs)
    assert torch.isfinite(L.build_objective([{"name": "plackett_luce"}, {"name": "sft"}], beta=0.1)(inputs).loss)


def test_example_without_a_rejected_response_is_a_data_error():
    inputs = _random_inputs()
    inputs.response_mask[0, 1] = False
    with pytest.raises(DataError):
        L.build_objective([{"name": "sigmoid"}], beta=0.1)(inputs)


def test_every_registered_loss_runs_through_the_objective_and_backpropagates():
    inputs = _random_inputs(batch=4, dtype=torch.float32)
    inputs.policy_logps.requires_grad_(True)
    token_seq = torch.arange(8).repeat_interleave(2)
    inputs.policy_token_logps = -torch.rand(16)
    inputs.token_seq = token_seq
    for name in L.available_losses():
        if L.LOSSES[name].kind == "unpaired":  # one completion and a label: tests/test_losses_unpaired.py
            continue
        out = L.build_objective([{"name": name}], beta=0.1)(inputs)
        assert out.loss.dim() == 0 and out.per_example.shape == (4,) and torch.isfinite(out.loss), name
        assert all(v.shape == (4,) and not v.requires_grad for v in out.metrics.values()), name
        (grad,) = torch.autograd.grad(out.loss, inputs.policy_logps)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_losses_upcast_half_precision_inputs():
    inputs = _random_inputs(dtype=torch.float32)
    half = L.LossInputs(inputs.policy_logps.bfloat16(), inputs.reference_logps.bfloat16(), inputs.lengths, inputs.response_mask)
    assert L.build_objective([{"name": "sigmoid"}], beta=0.1)(half).loss.dtype == torch.float32


def test_reward_accuracy_counts_a_tie_as_half():
    """Policy = reference (step 0): every reward is 0, each pair a tie, accuracy 0.5 rather than 0.
    A ranking with rewards (1, 1, 0): pairs (0 vs 1 tied: 0.5, 0 > 2: 1, 1 > 2: 1) -> 2.5 / 3."""
    logps = torch.tensor([[-10.0, -20.0], [-5.0, -5.0]])
    inputs = L.LossInputs(logps, logps.clone(), torch.ones(2, 2), torch.ones(2, 2, dtype=torch.bool))
    m = L.build_objective([{"name": "sigmoid"}], beta=0.1)(inputs).metrics
    torch.testing.assert_close(m["rewards/accuracies"], torch.tensor([0.5, 0.5]))
    policy = torch.tensor([[1.0, 1.0, 0.0]])
    ranked = L.LossInputs(policy, torch.zeros_like(policy), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool))
    m = L.build_objective([{"name": "plackett_luce"}], beta=1.0)(ranked).metrics
    torch.testing.assert_close(m["rewards/accuracies"], torch.tensor([2.5 / 3]))
