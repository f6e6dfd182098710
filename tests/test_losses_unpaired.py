"""ORPO, CPO / SimPO / AlphaPO and KTO / APO-zero-unpaired against TRL 1.16's own loss methods.

The numbers are ``tests/oracles/trl_1.16_unpaired_seed0.json`` (24 cases, float64 on exact float32
inputs; see tests/oracles/README.md for what each method takes). Every case is matched per example to
1e-6, or through a documented relation:

* ORPO: TRL's ``odds_ratio_loss`` returns ``beta * log sigma(log_odds) <= 0`` and its trainer subtracts
  the mean; dpokit's ``orpo`` term is the loss itself, so ``orpo(nll_weight=0) == -losses``. TRL's NLL
  runs over the chosen sequence's prompt *and* completion tokens; dpokit's (``nll_weight``) over the
  completion tokens only, the same normalisation as the ``sft`` term (not in the oracle).
* CPO's ``cpo_alpha`` is dpokit's ``bc_weight``; TRL's ``total_loss`` (= mean + cpo_alpha * NLL) is the
  objective's mean loss.
* TRL's ``alphapo`` leaves alpha at 0 unless given (then it is SimPO); dpokit's ``alphapo`` defaults to
  alpha 0.25, so the alpha-less TRL case is checked against dpokit's ``simpo``.
* KTO: TRL orders its loss tensor desirable-first; dpokit keeps input order (``losses`` in the file is
  TRL's mapped back to input order, and ``losses_trl_order`` is checked through ``trl_order``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpokit import losses as L
from dpokit.errors import ConfigError, DataError

ORACLE_PATH = Path(__file__).resolve().parent / "oracles" / "trl_1.16_unpaired_seed0.json"
ORACLE = json.loads(ORACLE_PATH.read_text())
CASES = {case["name"]: case for case in ORACLE["results"]}
RAW = ORACLE["inputs"]


def _t(key: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(RAW[key], dtype=dtype)


def _paired_inputs() -> L.LossInputs:
    policy = torch.stack([_t("policy_chosen_logps"), _t("policy_rejected_logps")], dim=1)
    lengths = torch.stack([torch.tensor(RAW["chosen_lengths"]), torch.tensor(RAW["rejected_lengths"])], dim=1)
    return L.LossInputs(policy, None, lengths, torch.ones_like(lengths, dtype=torch.bool))


def _kl_mean(case: dict) -> torch.Tensor:
    policy_kl, ref_kl = _t("policy_KL_logps"), _t("ref_KL_logps")
    if case["kl_inputs"] == "swapped":
        policy_kl, ref_kl = ref_kl, policy_kl
    return (policy_kl - ref_kl).mean()


def _unpaired_inputs(case: dict) -> L.LossInputs:
    policy, reference = _t("unpaired_policy_logps").unsqueeze(1), _t("unpaired_ref_logps").unsqueeze(1)
    lengths = torch.tensor(RAW["unpaired_lengths"]).unsqueeze(1)
    labels = torch.tensor(RAW["labels"], dtype=torch.bool)
    kl = _kl_mean(case) if case["loss_type"] == "kto" else None
    return L.LossInputs(policy, reference, lengths, torch.ones_like(lengths, dtype=torch.bool), labels=labels, kl=kl)


def _cpo_term(case: dict) -> dict:
    """The dpokit term for a TRL CPOTrainer case (module docstring)."""
    loss_type = case.get("effective_loss_type", case["loss_type"])
    term: dict = {"label_smoothing": case["label_smoothing"], "alpha": case["alpha"], "bc_weight": case["cpo_alpha"]}
    if loss_type == "simpo":
        term["gamma"] = case["simpo_gamma"]
        term["name"] = "alphapo" if case["alpha"] else "simpo"
    else:
        term.update(name="cpo", variant=loss_type)
    return term


def test_oracle_has_24_cases_and_nothing_failed():
    assert len(CASES) == 24 and not ORACLE["failed"]
    assert {c["trainer"] for c in CASES.values()} == {"KTOTrainer", "ORPOTrainer", "CPOTrainer"}


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.startswith("kto/")))
def test_kto_cases_match_trl_per_example(name):
    case = CASES[name]
    term = {
        "name": case["loss_type"],
        "desirable_weight": case["desirable_weight"],
        "undesirable_weight": case["undesirable_weight"],
    }
    inputs = _unpaired_inputs(case)
    out = L.build_objective([term], beta=case["beta"])(inputs)
    expected = torch.tensor(case["losses"], dtype=torch.float64)
    assert (out.per_example - expected).abs().max().item() < 1e-6
    assert out.loss.item() == pytest.approx(case["mean_loss"], abs=1e-9)
    # TRL's desirable-first tensor is the same values in another order.
    order = torch.tensor(case["trl_order"])
    torch.testing.assert_close(
        out.per_example[order], torch.tensor(case["losses_trl_order"], dtype=torch.float64), rtol=0, atol=1e-6
    )
    if case["loss_type"] == "kto":
        assert inputs.kl is not None
        assert inputs.kl.item() == pytest.approx(case["kl_before_clamp"], abs=1e-9)
        assert max(inputs.kl.item(), 0.0) == pytest.approx(case["kl"], abs=1e-12)
        assert out.metrics["kl"][0].item() == pytest.approx(case["kl_before_clamp"], abs=1e-9)
    # rewards: beta * log-ratio; the desirable / undesirable means are TRL's rewards/chosen, rewards/rejected
    desirable = out.metrics["rewards/desirable"]
    assert desirable[torch.isfinite(desirable)].mean().item() == pytest.approx(case["metrics"]["rewards/chosen"], abs=1e-9)
    undesirable = out.metrics["rewards/undesirable"]
    assert undesirable[torch.isfinite(undesirable)].mean().item() == pytest.approx(case["metrics"]["rewards/rejected"], abs=1e-9)
    logps = out.metrics["logps/desirable"]
    assert logps[torch.isfinite(logps)].mean().item() == pytest.approx(case["metrics"]["logps/chosen"], abs=1e-6)


def test_kto_with_the_kl_clamped_to_zero_equals_apo_zero_unpaired():
    """The oracle's note: with kl = 0, 1 - sigma(-x) = sigma(x), so kto == apo_zero_unpaired."""
    swapped = torch.tensor(CASES["kto/kto|kl_inputs=swapped"]["losses"])
    apo = torch.tensor(CASES["kto/apo_zero_unpaired"]["losses"])
    torch.testing.assert_close(swapped, apo, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.startswith("orpo/")))
def test_orpo_odds_ratio_term_is_minus_trls_losses(name):
    case = CASES[name]
    inputs = _paired_inputs()
    ours = L.orpo_loss(inputs.policy_logps[:, 0], inputs.policy_logps[:, 1], *inputs.lengths.T, beta=case["beta"], nll_weight=0.0)
    expected = -torch.tensor(case["losses"], dtype=torch.float64)
    assert (ours - expected).abs().max().item() < 1e-6
    # and TRL's own float32 values, to float32 precision
    assert (ours - (-torch.tensor(case["losses_float32"], dtype=torch.float64))).abs().max().item() < 2e-6
    out = L.build_objective([{"name": "orpo", "nll_weight": 0.0}], beta=case["beta"])(inputs)
    assert out.loss.item() == pytest.approx(-case["mean_loss"], abs=1e-9)


def test_orpo_nll_part_is_the_sft_term():
    inputs = _paired_inputs()
    with_nll = L.build_objective([{"name": "orpo"}], beta=0.1)(inputs)
    parts = L.build_objective([{"name": "orpo", "nll_weight": 0.0}, {"name": "sft"}], beta=0.1)(inputs)
    torch.testing.assert_close(with_nll.per_example, parts.per_example)


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.startswith("cpo/")))
def test_cpo_family_matches_trl_per_example(name):
    case = CASES[name]
    term = _cpo_term(case)
    inputs = _paired_inputs()
    spec = L.LOSSES[term["name"]]
    params = {k: v for k, v in term.items() if k != "name" and k in spec.params}
    without_bc = spec.function(*inputs.policy_logps.T, *inputs.lengths.T, beta=case["beta"], **{**params, "bc_weight": 0.0})
    expected = torch.tensor(case["losses"], dtype=torch.float64)
    assert (without_bc - expected).abs().max().item() < 1e-6
    out = L.build_objective([{"name": term["name"], **params}], beta=case["beta"])(inputs)
    assert out.loss.item() == pytest.approx(case["total_loss"], abs=1e-6)
    nll = -inputs.policy_logps[:, 0].sum() / inputs.lengths[:, 0].sum()
    if case["cpo_alpha"]:
        assert nll.item() == pytest.approx(case["nll_loss"], abs=1e-9)


def _objective_rewards(term: dict, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = L.build_objective([term], beta=beta)(_paired_inputs())
    return out.metrics["rewards/chosen"], out.metrics["rewards/rejected"], out.metrics["rewards/accuracies"]


@pytest.mark.parametrize("name", sorted(n for n in CASES if n.startswith(("cpo/", "orpo/"))))
def test_reference_free_objectives_report_the_reward_their_loss_compares_as_trl_does(name):
    """SimPO's rewards/* are beta * pi / |y| (length-averaged, as its loss compares them), not DPO's
    beta * (pi - ref) with ref = 0; CPO's are beta * pi (sigmoid/hinge) or beta * pi / |y| (ipo);
    ORPO's beta * pi / |y|; AlphaPO's beta * (1 - p^-alpha) / alpha. TRL's CPOTrainer and ORPOTrainer
    log exactly these (the oracle's chosen_rewards / rejected_rewards)."""
    case = CASES[name]
    if case["trainer"] == "ORPOTrainer":
        term: dict = {"name": "orpo"}
    else:
        term = _cpo_term(case)
        term = {k: v for k, v in term.items() if k == "name" or k in L.LOSSES[term["name"]].params}
    chosen, rejected, accuracies = _objective_rewards(term, case["beta"])
    torch.testing.assert_close(chosen, torch.tensor(case["chosen_rewards"], dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(rejected, torch.tensor(case["rejected_rewards"], dtype=torch.float64), rtol=0, atol=1e-6)
    if "metrics" in case:
        assert accuracies.mean().item() == pytest.approx(case["metrics"]["rewards/accuracies"], abs=1e-9)


def test_simpo_reward_hand_worked_and_the_objective_line_names_it():
    """One pair, beta 2: pi_w = -2 over 4 tokens, pi_l = -3 over 2. SimPO's rewards are
    2 * (-2 / 4) = -1.0 and 2 * (-3 / 2) = -3.0, margin 2.0, accuracy 1 -- where DPO's summed form
    (2 * -2 = -4 vs 2 * -3 = -6) would report rewards three times as large. The objective line says
    the reference is not used (the old line printed reference_free=False)."""
    inputs = L.LossInputs(
        torch.tensor([[-2.0, -3.0]], dtype=torch.float64), None, torch.tensor([[4, 2]]), torch.ones(1, 2, dtype=torch.bool)
    )
    objective = L.build_objective([{"name": "simpo", "gamma": 1.0}], beta=2.0)
    out = objective(inputs)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-1.0)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-3.0)
    assert out.metrics["rewards/margins"].item() == pytest.approx(2.0)
    assert "reference: not used" in repr(objective) and "per-token average" in repr(objective)
    assert "reference: used" in repr(L.build_objective([{"name": "sigmoid"}], beta=0.1))
    # a likelihood term first does not take over the rewards: sft + simpo reports SimPO's
    mixed = L.build_objective([{"name": "sft", "weight": 0.1}, {"name": "simpo", "gamma": 1.0}], beta=2.0)(inputs)
    assert mixed.metrics["rewards/chosen"].item() == pytest.approx(-1.0)


def test_trl_alphapo_without_alpha_is_simpo():
    case = CASES["cpo/alphapo|beta=2.0|simpo_gamma=1.0"]
    inputs = _paired_inputs()
    ours = L.simpo_loss(*inputs.policy_logps.T, *inputs.lengths.T, beta=2.0, gamma=1.0)
    assert (ours - torch.tensor(case["losses"], dtype=torch.float64)).abs().max().item() < 1e-6
    assert L.LOSSES["alphapo"].params["alpha"] == 0.25


def test_alphapo_rewards_stay_finite_where_trls_float32_overflow():
    """TRL computes exp(logps) ** -alpha: in float32 summed log-probs below about -104 give inf
    (57 of 64 losses of ``cpo/sigmoid|alpha=0.01``); -expm1(-alpha * logps) / alpha does not."""
    inputs = _paired_inputs()
    ours32 = L.cpo_loss(*inputs.policy_logps.float().T, *inputs.lengths.T, beta=0.1, alpha=0.01, bc_weight=0.0)
    assert torch.isfinite(ours32).all()
    expected = torch.tensor(CASES["cpo/sigmoid|alpha=0.01"]["losses"], dtype=torch.float64)
    assert ((ours32.double() - expected).abs() / expected.abs().clamp(min=1)).max().item() < 1e-5


# ------------------------------------------------------------------ hand-worked docstring examples

_LOG2, _LOG3 = math.log(2.0), math.log(3.0)


def _one(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def test_orpo_hand_worked():
    pi_w, pi_l, lw, ll = _one(2 * math.log(0.5)), _one(math.log(0.25)), torch.tensor([2]), torch.tensor([1])
    assert L.orpo_loss(pi_w, pi_l, lw, ll, beta=1.0, nll_weight=0.0).item() == pytest.approx(-math.log(0.75))
    assert L.orpo_loss(pi_w, pi_l, lw, ll, beta=1.0).item() == pytest.approx(0.980829, abs=1e-6)


def test_cpo_hand_worked():
    pi_w, pi_l, lengths = _one(-4.0), _one(-6.0), torch.tensor([1])
    sigmoid = L.cpo_loss(pi_w, pi_l, lengths, lengths, beta=0.5, bc_weight=0.0)
    assert sigmoid.item() == pytest.approx(0.313262, abs=1e-6)
    assert L.cpo_loss(pi_w, pi_l, lengths, lengths, beta=0.5, variant="hinge", bc_weight=0.0).item() == 0.0
    with_bc = L.cpo_loss(pi_w, pi_l, lengths, lengths, beta=0.5)
    assert with_bc.item() == pytest.approx(0.313262 + 4.0, abs=1e-6)


def test_simpo_hand_worked():
    loss = L.simpo_loss(_one(-2.0), _one(-3.0), torch.tensor([4]), torch.tensor([2]), beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))), abs=1e-9)


def test_alphapo_hand_worked():
    loss = L.alphapo_loss(
        _one(-_LOG2), _one(-math.log(4.0)), torch.tensor([1]), torch.tensor([1]), beta=1.0, alpha=1.0, gamma=0.0
    )
    assert loss.item() == pytest.approx(0.126928, abs=1e-6)
    # alpha -> 0 is SimPO
    near = L.alphapo_loss(_one(-1.0), _one(-2.0), torch.tensor([1]), torch.tensor([1]), beta=1.0, alpha=1e-8, gamma=0.0)
    simpo = L.simpo_loss(_one(-1.0), _one(-2.0), torch.tensor([1]), torch.tensor([1]), beta=1.0, gamma=0.0)
    assert near.item() == pytest.approx(simpo.item(), abs=1e-7)


def test_kto_hand_worked():
    rho, labels = torch.tensor([_LOG3, _LOG3], dtype=torch.float64), torch.tensor([True, False])
    clamped = L.kto_loss(rho, labels, torch.tensor(-0.3), beta=1.0)
    torch.testing.assert_close(clamped, torch.tensor([0.25, 0.75], dtype=torch.float64))
    at_kl = L.kto_loss(rho, labels, torch.tensor(_LOG3), beta=1.0)
    torch.testing.assert_close(at_kl, torch.tensor([0.5, 0.5], dtype=torch.float64))
    weighted = L.kto_loss(rho, labels, torch.tensor(0.0), beta=1.0, desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(weighted, torch.tensor([0.5, 0.375], dtype=torch.float64))


def test_apo_zero_unpaired_hand_worked():
    rho, labels = torch.tensor([_LOG3, _LOG3], dtype=torch.float64), torch.tensor([True, False])
    torch.testing.assert_close(L.apo_zero_unpaired_loss(rho, labels, beta=1.0), torch.tensor([0.25, 0.75], dtype=torch.float64))


# ------------------------------------------------------------------ gradients

_LENGTHS = (torch.tensor([3, 5, 2, 7, 4, 1]), torch.tensor([4, 2, 6, 3, 5, 2]))
_LABELS = torch.tensor([True, False, True, True, False, False])


def _negative_pair(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w = (-torch.rand(batch, generator=g, dtype=torch.float64) * 8 - 0.5).requires_grad_(True)
    r = (-torch.rand(batch, generator=g, dtype=torch.float64) * 8 - 0.5).requires_grad_(True)
    return w, r


GRADCHECK_CALLS = {
    "orpo": lambda w, r: L.orpo_loss(w, r, *_LENGTHS, beta=0.3),
    "cpo": lambda w, r: L.cpo_loss(w, r, *_LENGTHS, beta=0.3, label_smoothing=0.1),
    "cpo_hinge": lambda w, r: L.cpo_loss(w, r, *_LENGTHS, beta=0.01, variant="hinge"),
    "cpo_ipo": lambda w, r: L.cpo_loss(w, r, *_LENGTHS, beta=0.3, variant="ipo", alpha=0.1),
    "simpo": lambda w, r: L.simpo_loss(w, r, *_LENGTHS, beta=2.0, gamma=0.5, bc_weight=0.2),
    "alphapo": lambda w, r: L.alphapo_loss(w, r, *_LENGTHS, beta=2.0, alpha=0.25),
    "kto": lambda w, r: L.kto_loss(w - r, _LABELS, torch.tensor(0.4, dtype=torch.float64), beta=0.3, desirable_weight=1.3),
    "apo_zero_unpaired": lambda w, r: L.apo_zero_unpaired_loss(w - r, _LABELS, beta=0.3, undesirable_weight=0.7),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CALLS))
def test_new_loss_gradient_matches_finite_differences(name):
    w, r = _negative_pair()
    assert torch.autograd.gradcheck(GRADCHECK_CALLS[name], (w, r), eps=1e-6, atol=1e-5)


def test_kto_has_no_gradient_through_the_kl_reference_point():
    kl = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    rho = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    L.kto_loss(rho, torch.tensor([True, False]), kl, beta=0.5).sum().backward()
    assert kl.grad is None and rho.grad is not None


# ------------------------------------------------------------------ registry and objective


def test_reference_free_objectives_do_not_need_a_reference():
    for name in ("orpo", "cpo", "simpo", "alphapo"):
        objective = L.build_objective([{"name": name}], beta=0.1)
        assert not objective.needs_reference and not objective.unpaired and not objective.needs_kl, name
    kto = L.build_objective([{"name": "kto"}], beta=0.1)
    assert kto.needs_reference and kto.unpaired and kto.needs_kl
    apo = L.build_objective([{"name": "apo_zero_unpaired"}], beta=0.1)
    assert apo.needs_reference and apo.unpaired and not apo.needs_kl


def test_unpaired_losses_do_not_mix_with_paired_ones():
    with pytest.raises(ConfigError, match="unpaired"):
        L.build_objective([{"name": "kto"}, {"name": "sigmoid"}], beta=0.1)


def test_unpaired_objective_errors():
    inputs = _unpaired_inputs(CASES["kto/kto"])
    with pytest.raises(ConfigError, match="KL reference point"):
        L.build_objective([{"name": "kto"}], beta=0.1)(L.LossInputs(**{**vars(inputs), "kl": None}))
    with pytest.raises(DataError, match="label"):
        L.build_objective([{"name": "apo_zero_unpaired"}], beta=0.1)(L.LossInputs(**{**vars(inputs), "labels": None}))
    paired = _paired_inputs()
    with pytest.raises(DataError, match="one completion"):
        L.build_objective([{"name": "kto"}], beta=0.1)(L.LossInputs(**{**vars(paired), "reference_logps": paired.policy_logps}))
    with pytest.raises(ConfigError, match="variant"):
        L.build_objective([{"name": "cpo", "variant": "nope"}], beta=0.1)
    with pytest.raises(ConfigError, match="unknown CPO variant"):
        L.cpo_loss(_one(-1.0), _one(-2.0), torch.tensor([1]), torch.tensor([1]), beta=0.1, variant="nope")


def test_unpaired_objective_backpropagates_in_float32():
    inputs = _unpaired_inputs(CASES["kto/kto"])
    policy = inputs.policy_logps.float().requires_grad_(True)
    out = L.build_objective([{"name": "kto"}], beta=0.1)(L.LossInputs(**{**vars(inputs), "policy_logps": policy}))
    (grad,) = torch.autograd.grad(out.loss, policy)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(v.shape == (64,) and not v.requires_grad for v in out.metrics.values())
