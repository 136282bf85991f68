"""A strategy's loss and shapers as ``GRPOConfig`` arguments, and the check of a ``GRPOConfig`` against them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rlcredit.errors import SpecError
from rlcredit.losses import CISPO, GSPO, SAPO, ClippedSurrogate
from rlcredit.shapers import BatchNormalize, GroupCenter, GroupNormalize
from rlcredit.specs import build
from rlcredit.strategy import Strategy
from rlcredit.weighters import Uniform

__all__ = ["LOSS_TYPES", "loss_type_for", "scale_rewards_for", "trl_config_kwargs", "check_trl_args"]

LOSS_TYPES: Mapping[str, str] = {
    "grpo": "seq_mean_token_mean",
    "sapo": "seq_mean_token_mean",
    "bnpo": "token_mean",  # local (micro-batch) token count
    "dapo": "token_mean",  # global token count of the accumulated batch
    "cispo": "token_mean",
    "vespo": "token_mean",
    "luspo": "seq_mean_token_sum",
    "dr_grpo": "seq_mean_token_sum_norm",  # L = max_completion_length
}
"""TRL ``loss_type`` -> the rlcredit aggregation its denominator implements."""

_PREFERRED = {
    "token_mean": "dapo",
    "seq_mean_token_mean": "grpo",
    "seq_mean_token_sum": "luspo",
    "seq_mean_token_sum_norm": "dr_grpo",
}
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL's clipped-surrogate loss types (delta applies)
# Loss types whose denominator counts valid tokens of whole rows (grpo, sapo) or of the whole
# generation batch (dapo, cispo, vespo): a kept-weight denominator folds into the weights exactly.
_RENORMALIZABLE = ("grpo", "sapo", "dapo", "cispo", "vespo")


def loss_type_for(aggregation: str) -> str:
    """The TRL ``loss_type`` whose aggregation is rlcredit's ``aggregation``.

    ``token_mean`` -> ``dapo`` (global token count; ``bnpo`` counts the micro-batch only),
    ``seq_mean_token_mean`` -> ``grpo``, ``seq_mean_token_sum`` -> ``luspo`` (TRL's sequence-sum
    loss; it warns unless ``importance_sampling_level="sequence"``), ``seq_mean_token_sum_norm`` ->
    ``dr_grpo`` (``L = max_completion_length``).

    Args:
        aggregation: one of ``rlcredit.functional.AGGREGATIONS``.

    Returns:
        The TRL ``loss_type`` string.

    Raises:
        SpecError: unknown aggregation.

    Examples:
        >>> from rlcredit.integrations.trl import loss_type_for
        >>> loss_type_for("token_mean"), loss_type_for("seq_mean_token_mean")
        ('dapo', 'grpo')
    """
    if aggregation not in _PREFERRED:
        raise SpecError(
            f"unknown aggregation {aggregation!r}; expected one of {', '.join(map(repr, _PREFERRED))}."
        )
    return _PREFERRED[aggregation]


def _as_strategy(credit: Any) -> Strategy:
    if isinstance(credit, Strategy):
        return credit
    if isinstance(credit, (str, Mapping)) or hasattr(credit, "__fspath__"):
        return build(credit)
    raise SpecError(
        f"credit= takes a preset name, a spec dict, a spec file path or a rlcredit.Strategy, got "
        f"{type(credit).__name__}; e.g. credit='entropy_forks' (available: rlcredit.available('strategy'))."
    )


def _clipped(loss: Any) -> ClippedSurrogate | None:
    """The strategy's loss as a ``ClippedSurrogate`` (GSPO is one with a sequence ratio), else None."""
    if isinstance(loss, GSPO):
        return loss.as_clipped()
    return loss if isinstance(loss, ClippedSurrogate) else None


def _trl_form(loss: Any) -> ClippedSurrogate | CISPO | SAPO | None:
    """The strategy's loss as one TRL computes (a clipped surrogate, CISPO or SAPO), else None."""
    return loss if isinstance(loss, (CISPO, SAPO)) else _clipped(loss)


def _no_trl_loss(loss: Any, who: str) -> SpecError:
    name = type(loss).__name__
    return SpecError(
        f"{who}: TRL 1.16 has no loss_type that computes the strategy's policy loss {name} (TRL runs clipped "
        f"surrogates, cispo and sapo). CreditGRPOTrainer runs TRL's own loss, so training would silently use TRL's "
        f"loss_type instead of {name}. To train with {name}: override CreditGRPOTrainer._compute_loss to return "
        f"strategy.loss(...) (the recipe in docs/methods/papo.md, 'Supplying aux from a trainer'), or use verl "
        f"(loss_mode=rlcredit) or your own loop (examples/own_training_loop.py). To keep only this strategy's credit "
        f"with one of TRL's losses, replace its policy loss, e.g. rlcredit.build(spec, policy_loss='clipped_surrogate')."
    )


def scale_rewards_for(strategy: Strategy) -> str | None:
    """TRL's ``scale_rewards`` whose advantages the strategy's shaper chain starts with, or None.

    ``[group_normalize, ...]`` -> ``"group"``, ``[group_center, ...]`` -> ``"none"``,
    ``[batch_normalize(center=False), group_center, ...]`` -> ``"batch"`` (TRL's
    ``(r - mean_g r) / (std_b r + 1e-4)``). Shapers after that prefix (VPPO's
    ``dependency_scale``) are rlcredit's own. TRL adds ``1e-4`` to the std; rlcredit's
    ``group_normalize`` defaults to ``1e-6`` (``eps=1e-4`` reproduces TRL to float precision).

    Examples:
        >>> import rlcredit
        >>> from rlcredit.integrations.trl import scale_rewards_for
        >>> scale_rewards_for(rlcredit.build("dr_grpo"))
        'none'
        >>> scale_rewards_for(rlcredit.build({"shapers": [{"name": "batch_normalize", "center": False},
        ...                                               "group_center"]}))
        'batch'
    """
    shapers = strategy.shapers
    if shapers and isinstance(shapers[0], GroupNormalize):
        return "group"
    if shapers and isinstance(shapers[0], GroupCenter):
        return "none"
    if len(shapers) > 1 and isinstance(shapers[0], BatchNormalize) and not shapers[0].center \
            and isinstance(shapers[1], GroupCenter):
        return "batch"
    return None


def trl_config_kwargs(credit: Any) -> dict[str, Any]:
    """``GRPOConfig`` arguments that make TRL's loss and reward scaling match a strategy.

    From the strategy's ``clipped_surrogate`` (or ``gspo``): ``aggregation`` -> ``loss_type``
    (``loss_type_for``), ``clip_low`` -> ``epsilon``, ``clip_high`` -> ``epsilon_high``,
    ``kl_coef`` -> ``beta``; when set, ``dual_clip`` -> ``delta`` (TRL's cap on the ratio, which is
    the dual clip ``min(l, -c A)`` when ``c > 1 + clip_high``), ``ratio="sequence"`` ->
    ``importance_sampling_level="sequence"``, ``max_length`` -> ``max_completion_length``; with
    ``kl_coef > 0``, ``kl_bias_correction`` -> ``use_bias_correction_kl`` (TRL defaults to True,
    rlcredit to False). From ``cispo`` (``clip_low=None``, ``token_mean``): ``loss_type="cispo"``
    and ``epsilon_high = 1 + clip_high`` (TRL's absolute cap). From ``sapo``
    (``seq_mean_token_mean``): ``loss_type="sapo"``, ``sapo_temperature_pos = tau_pos``,
    ``sapo_temperature_neg = tau_neg``. From the shapers: ``scale_rewards``
    (``scale_rewards_for``), when the chain starts with one of TRL's. ``entropy_penalty`` has no
    TRL equivalent (a warning at trainer construction says so).

    Args:
        credit: a preset name, a spec dict or file, or a ``rlcredit.Strategy``.

    Returns:
        A dict to splat into ``trl.GRPOConfig(...)``.

    Raises:
        SpecError: the strategy's policy loss has no TRL ``loss_type`` (``gmpo``, ``kl_cov``,
            ``clip_cov``, ``papo``, a plugin), or a ``cispo``/``sapo`` that TRL's cannot be
            (``cispo`` with a lower bound ``clip_low`` or another aggregation than ``token_mean``,
            ``sapo`` with another aggregation than ``seq_mean_token_mean``).

    Examples:
        >>> from rlcredit.integrations.trl import trl_config_kwargs
        >>> trl_config_kwargs("dr_grpo")
        {'loss_type': 'dr_grpo', 'epsilon': 0.2, 'epsilon_high': 0.2, 'beta': 0.0, 'scale_rewards': 'none'}
        >>> trl_config_kwargs({"policy_loss": {"name": "clipped_surrogate", "dual_clip": 3.0, "kl_coef": 0.04}})
        {'loss_type': 'dapo', 'epsilon': 0.2, 'epsilon_high': 0.2, 'beta': 0.04, 'delta': 3.0, 'use_bias_correction_kl': False, 'scale_rewards': 'group'}
        >>> trl_config_kwargs("cispo")
        {'loss_type': 'cispo', 'epsilon_high': 1.28, 'beta': 0.0, 'scale_rewards': 'group'}
        >>> trl_config_kwargs("sapo")
        {'loss_type': 'sapo', 'sapo_temperature_pos': 1.0, 'sapo_temperature_neg': 1.05, 'beta': 0.0, 'scale_rewards': 'group'}
    """
    strategy = _as_strategy(credit)
    loss = _trl_form(strategy.policy_loss)
    if loss is None:
        raise _no_trl_loss(strategy.policy_loss, "trl_config_kwargs")
    out: dict[str, Any]
    if isinstance(loss, CISPO):
        if loss.clip_low is not None or loss.aggregation != "token_mean":
            raise SpecError(
                f"trl_config_kwargs: TRL's loss_type='cispo' caps the weight only above (at epsilon_high) and divides "
                f"by the generation batch's token count; the strategy's cispo has clip_low={loss.clip_low!r} and "
                f"aggregation={loss.aggregation!r}. Set clip_low=None and aggregation='token_mean' (the paper's form), "
                f"or run it under verl (loss_mode=rlcredit), whose cispo has both bounds and every aggregation."
            )
        out = {"loss_type": "cispo", "epsilon_high": 1.0 + float(loss.clip_high), "beta": 0.0}
    elif isinstance(loss, SAPO):
        if loss.aggregation != "seq_mean_token_mean":
            raise SpecError(
                f"trl_config_kwargs: TRL's loss_type='sapo' aggregates with 'seq_mean_token_mean'; the strategy's "
                f"sapo has aggregation={loss.aggregation!r}. Set aggregation='seq_mean_token_mean' (the default)."
            )
        out = {"loss_type": "sapo", "sapo_temperature_pos": float(loss.tau_pos),
               "sapo_temperature_neg": float(loss.tau_neg), "beta": 0.0}
    else:
        out = {
            "loss_type": loss_type_for(loss.aggregation),
            "epsilon": float(loss.clip_low),
            "epsilon_high": float(loss.clip_high),
            "beta": float(loss.kl_coef),
        }
        if loss.dual_clip is not None:
            out["delta"] = float(loss.dual_clip)
        if loss.ratio == "sequence":
            out["importance_sampling_level"] = "sequence"
        if loss.kl_coef > 0:
            out["use_bias_correction_kl"] = bool(loss.kl_bias_correction)
        if loss.max_length is not None:
            out["max_completion_length"] = int(loss.max_length)
    scale = scale_rewards_for(strategy)
    if scale is not None:
        out["scale_rewards"] = scale
    return out


def _check_loss_form(loss: ClippedSurrogate, args: Any, loss_type: str, strategy: Strategy) -> list[str]:
    """Messages on the clip range, dual clip, ratio level and KL of a clipped surrogate vs ``args``."""
    msgs: list[str] = []
    eps_low = float(getattr(args, "epsilon", 0.2))
    eps_high = getattr(args, "epsilon_high", None)
    eps_high = eps_low if eps_high is None else float(eps_high)
    clipped = loss_type in _CLIPPED
    if clipped and (abs(eps_low - loss.clip_low) > 1e-12 or abs(eps_high - loss.clip_high) > 1e-12):
        msgs.append(
            f"clip range: the strategy clips at (1 - {loss.clip_low}, 1 + {loss.clip_high}) but GRPOConfig "
            f"has epsilon={eps_low}, epsilon_high={eps_high}; TRL's values are used."
        )
    delta = getattr(args, "delta", None)
    if clipped and delta != loss.dual_clip:
        msgs.append(
            f"dual clip: the strategy has dual_clip={loss.dual_clip} but GRPOConfig.delta={delta}; TRL's delta is "
            f"what runs (it is TRL's dual clip: capping the ratio at delta gives min(l, -delta A) for A < 0)."
        )
    elif clipped and delta is not None and not float(delta) > 1.0 + eps_high:
        msgs.append(
            f"dual clip: GRPOConfig.delta={delta} <= 1 + epsilon_high = {1.0 + eps_high}: TRL's cap on the ratio "
            f"equals the dual clip min(l, -delta A) only for delta > 1 + epsilon_high (below, it dual-clips at "
            f"1 + epsilon_high and clips positive advantages at delta); raise dual_clip."
        )
    level = getattr(args, "importance_sampling_level", "token")
    if level != loss.ratio:
        msgs.append(
            f"importance sampling: the strategy's loss uses a {loss.ratio} ratio but "
            f"GRPOConfig.importance_sampling_level={level!r}; TRL's is what runs."
        )
    if level == "sequence" and not isinstance(strategy.weighter, Uniform):
        msgs.append(
            "token weights: with importance_sampling_level='sequence' TRL's per-token gradient goes through the "
            "sequence ratio, a mean over the row, so the strategy's token weights act only through their mean over "
            "each row (rlcredit's own sequence ratio, GSPO-token, keeps them per token)."
        )
    beta = float(getattr(args, "beta", 0.0))
    if abs(beta - loss.kl_coef) > 1e-12:
        msgs.append(f"kl: the strategy has kl_coef={loss.kl_coef} but GRPOConfig.beta={beta}; TRL's beta is used.")
    correction = bool(getattr(args, "use_bias_correction_kl", True))
    if loss.kl_coef > 0 and beta > 0:
        if correction != loss.kl_bias_correction:
            msgs.append(
                f"kl bias correction: the strategy has kl_bias_correction={loss.kl_bias_correction} but "
                f"GRPOConfig.use_bias_correction_kl={correction} (TRL's default is True); TRL's is used."
            )
        elif correction and level == "sequence":
            msgs.append(
                "kl bias correction: with importance_sampling_level='sequence' TRL multiplies the KL term by the "
                "sequence ratio, rlcredit's kl_bias_correction by the token ratio."
            )
    return msgs


def _check_gated_form(loss: CISPO | SAPO, args: Any, loss_type: str) -> list[str]:
    """Messages on a cispo/sapo loss vs ``args``: the loss type, its bound or temperatures, ratio level, KL."""
    want = "cispo" if isinstance(loss, CISPO) else "sapo"
    name = type(loss).__name__
    msgs: list[str] = []
    if loss_type != want:
        return [
            f"loss type: the strategy's {name} is TRL's loss_type={want!r} but GRPOConfig.loss_type={loss_type!r}; "
            f"TRL's loss_type is what runs. Pass GRPOConfig(**rlcredit.integrations.trl.trl_config_kwargs(credit)) "
            f"to match."
        ]
    if isinstance(loss, CISPO):
        eps_high = getattr(args, "epsilon_high", None)
        cap = float(getattr(args, "epsilon", 0.2) if eps_high is None else eps_high)
        if abs(cap - (1.0 + loss.clip_high)) > 1e-12:
            msgs.append(
                f"cispo cap: the strategy caps the weight at 1 + clip_high = {1.0 + loss.clip_high} but TRL's cispo "
                f"caps it at GRPOConfig.epsilon_high = {cap} (the absolute cap, not 1 + epsilon_high); TRL's is used."
            )
        if loss.clip_low is not None:
            msgs.append(
                f"cispo lower bound: TRL's cispo has no lower bound; the strategy's clip_low={loss.clip_low} is not "
                f"applied (keep clip_low=None, or use verl for a two-sided cispo)."
            )
        if loss.aggregation != "token_mean":
            msgs.append(f"aggregation: TRL's cispo aggregates as 'token_mean', the strategy's cispo as "
                        f"{loss.aggregation!r}; TRL's is used.")
    else:
        temps = (float(getattr(args, "sapo_temperature_pos", 1.0)), float(getattr(args, "sapo_temperature_neg", 1.05)))
        if abs(temps[0] - loss.tau_pos) > 1e-12 or abs(temps[1] - loss.tau_neg) > 1e-12:
            msgs.append(
                f"sapo temperatures: the strategy has tau_pos={loss.tau_pos}, tau_neg={loss.tau_neg} but GRPOConfig "
                f"has sapo_temperature_pos={temps[0]}, sapo_temperature_neg={temps[1]}; TRL's are used."
            )
        if loss.aggregation != "seq_mean_token_mean":
            msgs.append(f"aggregation: TRL's sapo aggregates as 'seq_mean_token_mean', the strategy's sapo as "
                        f"{loss.aggregation!r}; TRL's is used.")
    level = getattr(args, "importance_sampling_level", "token")
    if level != "token":
        msgs.append(f"importance sampling: the strategy's {name} uses a token ratio but "
                    f"GRPOConfig.importance_sampling_level={level!r}; TRL's is what runs.")
    beta = float(getattr(args, "beta", 0.0))
    if beta:
        msgs.append(f"kl: the strategy's {name} has no KL term but GRPOConfig.beta={beta}; TRL's beta is used.")
    return msgs


def _check_clipped(clipped: ClippedSurrogate, args: Any, loss_type: str, strategy: Strategy) -> list[str]:
    """Messages on a clipped surrogate vs ``args``: aggregation, loss form, clips, KL, entropy penalty, max length."""
    msgs: list[str] = []
    agg = clipped.aggregation
    if LOSS_TYPES.get(loss_type) != agg:
        msgs.append(
            f"aggregation: the strategy aggregates with {agg!r} (TRL loss_type={loss_type_for(agg)!r}) but "
            f"GRPOConfig.loss_type={loss_type!r} aggregates as {LOSS_TYPES.get(loss_type, '?')!r}; TRL's "
            f"loss_type is what runs. Pass GRPOConfig(**rlcredit.integrations.trl.trl_config_kwargs(credit)) "
            f"to match."
        )
    if loss_type not in _CLIPPED:
        msgs.append(
            f"loss form: GRPOConfig.loss_type={loss_type!r} is not a clipped surrogate, so the strategy's "
            f"clip_low/clip_high/dual_clip do not apply (token weights still fold in exactly)."
        )
    msgs += _check_loss_form(clipped, args, loss_type, strategy)
    if clipped.entropy_penalty:
        msgs.append(
            f"entropy penalty: TRL has no -log pi penalty; the strategy's entropy_penalty="
            f"{clipped.entropy_penalty} is ignored (TRL's entropy_coef is a bonus on the true entropy, a "
            f"different term)."
        )
    max_length = clipped.max_length
    if max_length is not None and loss_type == "dr_grpo" and max_length != getattr(args, "max_completion_length", None):
        msgs.append(
            f"max length: the strategy normalises by max_length={max_length} but TRL's dr_grpo uses "
            f"max_completion_length={args.max_completion_length}."
        )
    return msgs


def check_trl_args(strategy: Strategy, args: Any, *, strategy_loss: bool = False) -> list[str]:
    """Check a strategy against a ``GRPOConfig``: raise on impossible combinations, list the odd ones.

    Raises for ``use_liger_kernel=True`` (rlcredit folds credit into ``[B, T]`` advantages and
    supports only TRL's own loss path), for ``renormalize=True`` with a ``loss_type`` whose
    denominator is not a token count of whole rows (``grpo``, ``sapo``) or of the whole generation
    batch (``dapo``, ``cispo``, ``vespo``): only those let a kept-weight denominator be folded into
    the weights, and for a policy loss TRL has no ``loss_type`` for (``gmpo``, ``kl_cov``,
    ``clip_cov``, ``papo``, a plugin loss): TRL's loss would silently run in its place, so the
    error says how to run it instead. Returns a message for each inconsistency that TRL will
    silently resolve its own way: aggregation vs ``loss_type``; clip range vs
    ``epsilon``/``epsilon_high``; ``dual_clip`` vs ``delta`` (and a ``delta <= 1 +
    epsilon_high``, where the two differ); the ratio vs ``importance_sampling_level`` (and token
    weights under a sequence ratio); ``kl_coef`` vs ``beta`` and ``kl_bias_correction`` vs
    ``use_bias_correction_kl``; for ``cispo``/``sapo``: ``loss_type``, ``1 + clip_high`` vs
    ``epsilon_high`` (TRL's absolute cap), a ``clip_low`` (TRL's cispo has no lower bound), the
    temperatures vs ``sapo_temperature_pos/neg``, a sequence ratio, ``beta > 0``;
    ``entropy_penalty`` (no TRL equivalent); ``max_length`` vs ``max_completion_length``;
    ``top_entropy_quantile < 1`` (TRL's own entropy mask is then applied on top of the strategy's
    weights); reward scaling (``scale_rewards_for`` vs ``scale_rewards``) and multi-objective
    aggregation (the strategy's shapers replace TRL's advantages).

    Args:
        strategy: the ``rlcredit.Strategy``.
        args: a ``trl.GRPOConfig``.
        strategy_loss: True when the strategy's own loss runs instead of TRL's (a subclass of
            ``CreditGRPOTrainer`` that overrides ``_compute_loss`` to return ``strategy.loss``; the
            trainer detects it): the loss checks are skipped, the credit checks stay.

    Returns:
        A list of warning messages (empty when consistent).

    Raises:
        SpecError: ``use_liger_kernel=True``, ``renormalize=True`` with another ``loss_type``, or a
            policy loss TRL has no ``loss_type`` for (unless ``strategy_loss``).

    Examples:
        >>> import types, rlcredit
        >>> from rlcredit.integrations.trl import check_trl_args
        >>> args = types.SimpleNamespace(loss_type="grpo", epsilon=0.2, epsilon_high=None)  # a GRPOConfig
        >>> [m.split(":")[0] for m in check_trl_args(rlcredit.build("dapo"), args)]
        ['aggregation', 'clip range']
    """
    if getattr(args, "use_liger_kernel", False):
        raise SpecError(
            "CreditGRPOTrainer does not support use_liger_kernel=True: rlcredit folds its token weights into "
            "[B, T] advantages, which only TRL's own loss path is tested to accept (Liger's fused GRPO loss takes "
            "one advantage per sequence; TRL 1.16 deprecates use_liger_kernel in favour of Hub kernels, "
            "model_init_kwargs={'use_kernels': True}). Set use_liger_kernel=False."
        )
    loss = strategy.policy_loss
    loss_type = getattr(args, "loss_type", "dapo")
    if getattr(loss, "renormalize", False) and loss_type not in _RENORMALIZABLE:
        raise SpecError(
            f"CreditGRPOTrainer cannot run a strategy whose policy loss has renormalize=True with "
            f"loss_type={loss_type!r}: that loss has no token-count denominator (or only a micro-batch one) to "
            f"rescale, so a kept-weight denominator (STAPO) cannot be folded into advantages. Use loss_type in "
            f"{', '.join(map(repr, _RENORMALIZABLE))}, or renormalize=False."
        )
    msgs: list[str] = []
    if not strategy_loss:  # else the strategy's own loss runs: nothing of TRL's loss configuration applies
        form = _trl_form(loss)
        if form is None:
            raise _no_trl_loss(loss, "CreditGRPOTrainer")
        if isinstance(form, (CISPO, SAPO)):
            msgs += _check_gated_form(form, args, loss_type)
        else:
            msgs += _check_clipped(form, args, loss_type, strategy)
    if float(getattr(args, "top_entropy_quantile", 1.0)) < 1.0:
        msgs.append(
            f"entropy mask: GRPOConfig.top_entropy_quantile={args.top_entropy_quantile} makes TRL multiply its own "
            f"high-entropy mask (current policy, per micro-batch) on top of the strategy's token weights; use "
            f"credit='entropy_forks' with top_entropy_quantile=1.0 instead of both."
        )
    expected = scale_rewards_for(strategy)
    scale = getattr(args, "scale_rewards", "group")
    scale = {True: "group", False: "none"}.get(scale, scale)
    if expected is not None and scale != expected:
        msgs.append(
            f"reward scaling: the strategy's advantages replace TRL's, so GRPOConfig.scale_rewards={scale!r} is "
            f"ignored (the strategy's shapers behave like scale_rewards={expected!r})."
        )
    if getattr(args, "multi_objective_aggregation", "sum_then_normalize") != "sum_then_normalize":
        msgs.append(
            "rewards: the strategy shapes the weighted sum of the reward functions (sum_then_normalize); "
            f"GRPOConfig.multi_objective_aggregation={args.multi_objective_aggregation!r} is ignored."
        )
    return msgs
