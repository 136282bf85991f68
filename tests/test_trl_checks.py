"""CreditGRPOTrainer's checks: every preset's loss under TRL, text-only models, token ids, batches that keep nothing.

- ``trl_config_kwargs`` gives a config ``check_trl_args`` finds consistent for every preset whose loss
  TRL has (the clipped surrogates, ``cispo``, ``sapo``); the others (``gmpo``, ``kl_cov``,
  ``clip_cov``, ``papo``) raise, in both, saying how to run them, unless a subclass's
  ``_compute_loss`` runs the strategy's own loss (trained here for ``gmpo``).
- A strategy that reads images fails at construction with a text-only model, naming the requirement.
- ``rollout.response_ids`` is TRL's ``completion_ids`` (``token_match``).
- A batch whose weights keep no token is visible: ``rlcredit/kept_tokens`` = 0 and one warning.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

pytest.importorskip("trl")  # the `trl` extra is optional for the core

import rlcredit  # noqa: E402
from rlcredit.errors import SpecError  # noqa: E402
from rlcredit.integrations.trl import CreditGRPOTrainer, check_trl_args, trl_config_kwargs  # noqa: E402
from rlcredit.losses import CISPO, SAPO, ClippedSurrogate, GSPO  # noqa: E402
from tests.trl_setup import (  # noqa: E402  (fixtures: tokenizer, base_model, dataset)
    base_model, dataset, make_args, make_trainer, quiet, tokenizer,
)

TRL_LOSSES = (ClippedSurrogate, GSPO, CISPO, SAPO)
NO_TRL_LOSS = ["gmpo", "kl_cov", "clip_cov", "papo"]


@pytest.mark.parametrize("preset", rlcredit.available("strategy"))
def test_every_preset_maps_onto_trl_or_says_why_not(preset, tmp_path):
    strategy = rlcredit.build(preset)
    if not isinstance(strategy.policy_loss, TRL_LOSSES):
        assert preset in NO_TRL_LOSS
        name = type(strategy.policy_loss).__name__
        for call in (lambda: trl_config_kwargs(preset), lambda: check_trl_args(strategy, make_args(tmp_path))):
            with pytest.raises(SpecError, match=f"no loss_type that computes the strategy's policy loss {name}.*"
                                                f"_compute_loss.*policy_loss='clipped_surrogate'"):
                call()
        return
    args = quiet(make_args, tmp_path, **trl_config_kwargs(preset))
    heads = [m.split(":")[0] for m in check_trl_args(strategy, args)]
    # VPPO's entropy penalty is the one term TRL cannot run (no -log pi penalty): the only message left.
    assert heads == (["entropy penalty"] if getattr(strategy.policy_loss, "entropy_penalty", 0) else [])


def test_cispo_and_sapo_configs():
    assert trl_config_kwargs({"policy_loss": {"name": "cispo", "clip_high": 4.0}}) == {
        "loss_type": "cispo", "epsilon_high": 5.0, "beta": 0.0, "scale_rewards": "group"}
    assert trl_config_kwargs({"shapers": ["group_center"], "policy_loss": {"name": "sapo", "tau_neg": 2.0}}) == {
        "loss_type": "sapo", "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 2.0, "beta": 0.0,
        "scale_rewards": "none"}
    with pytest.raises(SpecError, match="clip_low=0.2.*Set clip_low=None"):
        trl_config_kwargs({"policy_loss": {"name": "cispo", "clip_low": 0.2}})
    with pytest.raises(SpecError, match="aggregation='seq_mean_token_mean'"):
        trl_config_kwargs({"policy_loss": {"name": "cispo", "aggregation": "seq_mean_token_mean"}})
    with pytest.raises(SpecError, match="TRL's loss_type='sapo' aggregates with 'seq_mean_token_mean'"):
        trl_config_kwargs({"policy_loss": {"name": "sapo", "aggregation": "token_mean"}})


def test_check_trl_args_lists_each_cispo_and_sapo_inconsistency():
    cispo = rlcredit.build({"policy_loss": {"name": "cispo", "clip_low": 0.1, "aggregation": "seq_mean_token_mean"}})
    args = types.SimpleNamespace(loss_type="cispo", epsilon_high=0.28, importance_sampling_level="sequence", beta=0.1)
    msgs = check_trl_args(cispo, args)
    assert [m.split(":")[0] for m in msgs] == ["cispo cap", "cispo lower bound", "aggregation", "importance sampling",
                                                "kl"]
    assert "1 + clip_high = 1.28" in msgs[0] and "epsilon_high = 0.28" in msgs[0]
    sapo = rlcredit.build("sapo")
    args = types.SimpleNamespace(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=1.05)
    assert [m.split(":")[0] for m in check_trl_args(sapo, args)] == ["sapo temperatures"]
    wrong = check_trl_args(sapo, types.SimpleNamespace(loss_type="dapo"))
    assert [m.split(":")[0] for m in wrong] == ["loss type"] and "loss_type='sapo'" in wrong[0]
    assert check_trl_args(rlcredit.build("cispo"), types.SimpleNamespace(loss_type="cispo", epsilon_high=1.28)) == []


def test_a_loss_trl_lacks_raises_at_construction(base_model, tokenizer, dataset, tmp_path):
    with pytest.raises(SpecError, match="policy loss GMPO"):
        make_trainer(CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path, credit="gmpo")


class OwnLossTrainer(CreditGRPOTrainer):
    """The recipe for a loss TRL lacks: ``_compute_loss`` returns the strategy's own loss on the micro-batch."""

    def _compute_loss(self, model, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        logps, _, _ = self._get_per_token_logps_and_entropies(model, ids, attention, inputs["completion_ids"].size(1))
        mask = inputs["completion_mask"].bool()
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        rows = mask.shape[0]
        rollout = rlcredit.Rollout(mask, torch.zeros(rows), torch.arange(rows), old_logprobs=torch.where(mask, old, 0.0))
        credit = rlcredit.Credit({}, mask.float(), inputs["advantages"])  # weights already folded into A
        loss = self.credit_strategy.loss(logps, rollout, credit).loss
        self.own_losses.append(loss.detach())
        return loss


def test_a_compute_loss_override_runs_the_strategys_own_loss(base_model, tokenizer, dataset, tmp_path):
    """gmpo through TRL's trainer: no SpecError for a subclass that runs the strategy's loss; it trains."""
    trainer = quiet(make_trainer, OwnLossTrainer, base_model, tokenizer, dataset, tmp_path, credit="gmpo")
    trainer.own_losses = []
    before = [p.detach().clone() for p in trainer.model.parameters()]
    quiet(trainer.train)
    assert trainer.state.global_step == 2 and len(trainer.own_losses) == 2
    assert all(torch.isfinite(x) for x in trainer.own_losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("preset,part", [("vppo", "estimator 'visual'"), ("at_rl", "estimator 'connectivity'")])
def test_a_strategy_that_reads_images_fails_at_construction_with_a_text_model(preset, part, base_model, tokenizer,
                                                                               dataset, tmp_path):
    with pytest.raises(SpecError, match=f"needs a vision-language model: its {part} requires .*a policy.*"
                                        f"model_type 'qwen2'.*text-only.*examples/trl_vppo.py"):
        quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path, credit=preset,
              args=trl_config_kwargs("dapo"))


TOKENS = {"estimators": {"words": {"name": "token_match", "ids": list(range(3, 34))}},  # half the vocabulary
          "weighter": {"name": "threshold", "value": 0.5, "score": "words"}}


def test_response_ids_are_trls_completion_ids(base_model, tokenizer, dataset, tmp_path):
    trainer = quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path, credit=TOKENS,
                    args={"max_steps": 1})
    quiet(trainer.train)
    r, credit = trainer.last_rollout, trainer.last_credit
    ids = r.response_ids
    assert ids is not None and ids.shape == r.response_mask.shape and ids.dtype == torch.long
    want = ((ids >= 3) & (ids < 34) & r.response_mask).float()  # token_match by hand on the completion ids
    assert torch.equal(credit.token_weights, want) and 0 < float(want.sum()) < float(r.response_mask.sum())


def test_a_batch_that_keeps_no_token_is_visible(base_model, tokenizer, dataset, tmp_path):
    """Weights that never keep a token (an id outside the vocabulary): kept_tokens = 0 is logged every step and one
    warning says the step trains nothing, from the metrics TRL already gathers (no extra host sync)."""
    nothing = {**TOKENS, "estimators": {"words": {"name": "token_match", "ids": [10_000]}}}
    trainer = quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path, credit=nothing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    zero = [w for w in caught if "kept no token" in str(w.message)]
    assert len(zero) == 1 and "Threshold" in str(zero[0].message) and "docs/troubleshooting.md" in str(zero[0].message)
    logged = [h["rlcredit/kept_tokens"] for h in trainer.state.log_history if "rlcredit/kept_tokens" in h]
    assert logged == [0.0, 0.0]
    assert float(trainer.last_credit.metrics["kept_tokens"]) == 0.0

    keeps = quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path / "b", credit=TOKENS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keeps.train()
    assert not [w for w in caught if "kept no token" in str(w.message)]
    logged = [h["rlcredit/kept_tokens"] for h in keeps.state.log_history if "rlcredit/kept_tokens" in h]
    assert len(logged) == 2 and all(x > 0 for x in logged)
    mask = keeps.last_rollout.response_mask
    assert float(keeps.last_credit.metrics["kept_tokens"]) == float(((keeps.last_credit.token_weights > 0) & mask).sum())
