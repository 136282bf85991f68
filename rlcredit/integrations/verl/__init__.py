"""verl integration: a policy loss and an advantage estimator named ``"rlcredit"``, plus a worker hook.

Supported: verl 0.9 (the contract test runs verl 0.9.1's own registry and ``agg_loss``). This
module imports without verl. When verl is importable, importing it registers, in verl's own
registries (``verl.trainer.ppo.core_algos``):

- the policy loss ``"rlcredit"`` (``actor_rollout_ref.actor.policy_loss.loss_mode=rlcredit``), with
  verl's exact signature ``(old_log_prob, log_prob, advantages, response_mask,
  loss_agg_mode="token-mean", config=None, rollout_is_weights=None) -> (loss, metrics)``: the
  strategy's own ``policy_loss`` on verl's ``[B, T]`` advantages, with verl's actor config
  (``clip_ratio_low``/``clip_ratio_high``, ``clip_ratio_c``, ``loss_agg_mode``) wherever the
  strategy leaves a value at its default (``verl_policy_loss``), verl's rollout-correction
  weights as token weights and verl's global batch statistics as denominators (so dp ranks and
  micro-batches add up as in ``agg_loss``), and verl's metric keys;
- the advantage estimator ``"rlcredit"`` (``algorithm.adv_estimator=rlcredit``): the strategy's
  ``assign`` on the rewards, response mask and group ids (``uid``), its token weights folded into
  ``[B, T]`` advantages ``A_{i,t} = w_{i,t} A_i`` (exact for ``w >= 0``).

verl imports every module named in ``VERL_USE_EXTERNAL_MODULES`` in the driver and in each worker,
so ``VERL_USE_EXTERNAL_MODULES=rlcredit.integrations.verl`` is all the wiring needed.

The strategy: the config key ``rlcredit_strategy`` when the config passed to the loss or the
estimator carries one (dict-style configs), else the environment variable ``RLCREDIT_STRATEGY``:
a preset name, a spec file path, or a JSON spec. verl's structured dataclass configs reject unknown
keys, so with them use the environment variable (and make it reach the Ray workers, e.g.
``+ray_kwargs.ray_init.runtime_env.env_vars.RLCREDIT_STRATEGY=entropy_forks``). The advantage
estimator's hyper-parameters come from the rlcredit spec (verl's ``norm_adv_by_std_in_grpo`` is
not read); the policy loss follows verl's actor config unless the strategy sets a value
explicitly (``verl_policy_loss``; a disagreement warns once).

verl's estimator hook only sees rewards, the response mask and the group ids, so a strategy that
scores tokens needs ``apply_credit``, called where the data is (see ``credit_location``):
``entropy_forks`` and ``stapo`` need the per-token entropies (and old log-probs) verl's actor
computes; ``vppo``/``vppo_paper`` need a second forward with the perturbed image and ``at_rl`` an
attention capture, both through the model, so they run in the actor worker; ``vppo_released``
(the image blackened before the processor) also needs ``processor=`` and each row's images.

Examples:
    >>> from rlcredit.integrations.verl import credit_location
    >>> credit_location("grpo"), credit_location("entropy_forks"), credit_location("vppo")
    ('advantage_estimator', 'batch', 'worker')
"""

from __future__ import annotations

from rlcredit.integrations.verl._actor import VERL_ACTOR_DEFAULTS, verl_policy_loss
from rlcredit.integrations.verl._advantage import apply_credit, compute_advantage
from rlcredit.integrations.verl._loss import aggregate, compute_policy_loss, verl_totals
from rlcredit.integrations.verl._strategy import (
    AGG_MODES, CONFIG_KEY, NAME, STRATEGY_ENV, credit_location, resolve_strategy,
)

__all__ = [
    "NAME", "STRATEGY_ENV", "CONFIG_KEY", "AGG_MODES", "REGISTERED",
    "resolve_strategy", "compute_policy_loss", "compute_advantage", "aggregate", "apply_credit",
    "credit_location", "register", "verl_totals", "verl_policy_loss", "VERL_ACTOR_DEFAULTS",
]


def register() -> bool:
    """Register ``"rlcredit"`` in verl's policy-loss and advantage-estimator registries.

    Called on import; idempotent (re-importing this module replaces its own earlier entries).

    Returns:
        True when verl is importable and both names are registered, False without verl.

    Examples:
        >>> from rlcredit.integrations.verl import register
        >>> isinstance(register(), bool)
        True
    """
    try:
        from verl.trainer.ppo import core_algos
    except ImportError:
        return False
    estimators = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", {})
    previous = estimators.get(NAME)
    if previous is not None and previous is not compute_advantage and \
            str(getattr(previous, "__module__", "")).startswith(__name__):
        del estimators[NAME]  # our own entry from an earlier import of this module (e.g. a reload)
    core_algos.register_policy_loss(NAME)(compute_policy_loss)
    core_algos.register_adv_est(NAME)(compute_advantage)
    return True


REGISTERED: bool = register()
"""Whether importing this module registered ``"rlcredit"`` in verl (False when verl is absent)."""
