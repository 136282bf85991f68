"""Which policy loss runs under verl: verl's actor config wherever the strategy leaves a value at its default."""

from __future__ import annotations

import inspect
import types
import warnings
from typing import Any

import attrs

from rlcredit.errors import SpecError
from rlcredit.integrations.verl._strategy import _VERL_MODES, AGG_MODES, _get, _as_strategy
from rlcredit.losses import GSPO, ClippedSurrogate
from rlcredit.losses._common import aux_names
from rlcredit.requirements import Field, leaves, requirements_of

__all__ = ["VERL_ACTOR_DEFAULTS", "verl_policy_loss"]

VERL_ACTOR_DEFAULTS = {"clip_ratio": 0.2, "clip_ratio_c": 3.0, "loss_agg_mode": "token-mean"}
"""verl 0.9.1's ``ActorConfig`` defaults, used for keys a (dict-style) config does not carry."""

# The losses whose hyper-parameters verl's actor config also sets (verl's `vanilla` and `gspo` read
# clip_ratio*, vanilla also clip_ratio_c, both loss_agg_mode). Other losses run the strategy's own values.
_FOLLOWS_ACTOR = (ClippedSurrogate, GSPO)
_WARNED: set[str] = set()


def _actor_values(config: Any, loss_agg_mode: str) -> dict[str, tuple[Any, str]]:
    """rlcredit field -> (verl's value, the actor config key it comes from), as verl's vanilla reads them."""
    clip = _get(config, "clip_ratio")
    clip = VERL_ACTOR_DEFAULTS["clip_ratio"] if clip is None else clip
    low, high = _get(config, "clip_ratio_low"), _get(config, "clip_ratio_high")
    dual = _get(config, "clip_ratio_c")
    return {
        "clip_low": (float(clip if low is None else low), "clip_ratio_low"),
        "clip_high": (float(clip if high is None else high), "clip_ratio_high"),
        "dual_clip": (float(VERL_ACTOR_DEFAULTS["clip_ratio_c"] if dual is None else dual), "clip_ratio_c"),
        "aggregation": (AGG_MODES.get(loss_agg_mode, loss_agg_mode), "loss_agg_mode"),
    }


# What a verl policy loss is given, as a rollout: old log-probs (and the advantages, mask and IS weights
# every loss reads). No reference log-probs, signals, model inputs, policy or aux tensors.
_LOSS_VIEW = types.SimpleNamespace(old_logprobs=True, ref_logprobs=None, model_inputs=None, response_ids=None,
                                   signals={})


def _takes_totals(loss: Any) -> bool:
    try:
        params = inspect.signature(loss).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "totals" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _check_loss(loss: Any) -> Any:
    """Raise a ``SpecError`` unless ``loss`` can run as verl's policy loss ``"rlcredit"``; return it.

    verl calls a policy loss with ``(old_log_prob, log_prob, advantages, response_mask,
    loss_agg_mode, config, rollout_is_weights)`` and its global batch statistics: a loss runs when
    it needs nothing else (no reference log-probs, ``signals``, ``model_inputs``, policy or ``aux``
    tensor), divides by given ``totals=`` (so micro-batches and dp ranks add up) and does not
    renormalise by the kept weight (verl counts tokens, not weight). All built-in losses but
    ``papo`` qualify (``kl_coef=0``, ``renormalize=False``).
    """
    name = type(loss).__name__
    aux = aux_names(loss)
    if aux:
        raise SpecError(
            f"the verl policy loss 'rlcredit' cannot run {name}: it reads aux[{aux[0]!r}], a differentiable tensor "
            f"computed in the training step (PAPO: the current policy's log-probs with the masked image), and verl's "
            f"policy-loss signature (old_log_prob, log_prob, advantages, response_mask, ...) has no place for it. "
            f"Replace verl's ppo_loss with a loss function that computes it and calls strategy.loss(..., aux=...) "
            f"(docs/methods/papo.md, 'Supplying aux from a trainer'), or use a strategy without it with "
            f"loss_mode=rlcredit (e.g. PAPO's surrogate alone)."
        )
    unmet = [req for req in requirements_of(loss) if not req.met(_LOSS_VIEW, None)]
    if any(Field("ref_logprobs") in leaves(req) for req in unmet):
        raise SpecError(
            "verl does not pass reference log-probs to policy losses; set the strategy's kl_coef=0 and use verl's "
            "actor.use_kl_loss=True / actor.kl_loss_coef for the KL term."
        )
    if unmet:
        raise SpecError(
            f"the verl policy loss 'rlcredit' cannot run {name}: it needs {'; '.join(r.describe() for r in unmet)}, "
            f"which verl's policy-loss call does not carry (it passes old and current log-probs, advantages, the "
            f"response mask and IS weights). Compute the loss in your own verl loss function with strategy.loss."
        )
    if getattr(loss, "renormalize", False):
        raise SpecError(
            "verl's global batch statistics count valid tokens, not kept weight; renormalize=True is not supported "
            "by the 'rlcredit' verl loss. Set renormalize=False."
        )
    if not _takes_totals(loss):
        raise SpecError(
            f"the verl policy loss 'rlcredit' divides by verl's global batch statistics through the loss's `totals=` "
            f"argument, which {name} does not take: its micro-batch losses would not add up to the mini-batch loss. "
            f"Give {name}.__call__ a `totals: rlcredit.functional.Totals | None = None` argument and aggregate with "
            f"rlcredit.functional.loss_coefficients(..., totals=totals)."
        )
    return loss


def _warn_once(message: str) -> None:
    if message not in _WARNED:  # one warning per process, not one per micro-batch
        _WARNED.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def verl_policy_loss(credit: Any = None, config: Any = None, loss_agg_mode: str | None = None) -> Any:
    """The policy loss that ``loss_mode=rlcredit`` runs: verl's actor config where the strategy is silent.

    For a ``clipped_surrogate`` (or ``gspo``) loss, each hyper-parameter verl's actor config also
    sets runs with **verl's value unless the strategy sets it explicitly**; a value counts as
    explicit when it differs from ``clipped_surrogate``'s default (``attrs.fields``), so the
    ``dapo`` preset's ``clip_high=0.28``, ``dr_grpo``'s ``seq_mean_token_sum_norm`` and the
    ``gspo`` loss's clip range and aggregation are explicit, ``grpo``'s clip range is not. The mapping: ``clip_low`` <- ``clip_ratio_low``
    (else ``clip_ratio``), ``clip_high`` <- ``clip_ratio_high`` (else ``clip_ratio``),
    ``dual_clip`` <- ``clip_ratio_c`` (verl's ``vanilla`` always applies its dual clip, default
    3.0; ``gspo`` has no dual clip), ``aggregation`` <- ``loss_agg_mode``; ``max_length`` left
    unset uses verl's ``loss_scale_factor`` (``verl_totals``). An explicit value that disagrees
    with verl's config warns once per process, naming both; the strategy's value then runs. Keys
    the config lacks take verl 0.9.1's defaults (``VERL_ACTOR_DEFAULTS``). Other losses run the
    strategy's own values (a ``loss_agg_mode`` that differs from their aggregation warns).

    Args:
        credit: a preset name, spec or ``rlcredit.Strategy`` (None: ``resolve_strategy(config)``).
        config: verl's actor config (``ActorConfig`` or a mapping), or None.
        loss_agg_mode: verl's ``loss_agg_mode`` (None: ``config.loss_agg_mode``, else ``token-mean``).

    Returns:
        The policy loss object (the strategy's, with verl's values filled in).

    Which losses run: every built-in one but ``papo`` (``clipped_surrogate``, ``gspo``, ``cispo``,
    ``sapo``, ``gmpo``, ``kl_cov``, ``clip_cov``); a loss runs when it needs nothing verl's
    policy-loss call does not carry and divides by given ``totals=`` (verl's global batch
    statistics, ``verl_totals``).

    Raises:
        SpecError: verl's value is one rlcredit rejects (``loss_agg_mode="token-sum"``, a
            ``clip_ratio_c <= 1``) for a field the strategy leaves at its default; or a loss verl
            cannot feed: one that reads an ``aux`` tensor (``papo``: say how to run it instead),
            reference log-probs (``kl_coef > 0``: use verl's ``use_kl_loss``), another rollout
            field or signal, has ``renormalize=True``, or takes no ``totals=``.

    Examples:
        >>> from rlcredit.integrations.verl import verl_policy_loss
        >>> loss = verl_policy_loss("grpo", {"clip_ratio": 0.2})  # verl's dual clip 3.0 runs
        >>> loss.dual_clip, loss.clip_high
        (3.0, 0.2)
        >>> verl_policy_loss("dapo", {"clip_ratio_high": 0.28}).clip_high  # explicit in dapo, and agreeing
        0.28
        >>> verl_policy_loss("grpo", {"loss_agg_mode": "seq-mean-token-mean"}).aggregation
        'seq_mean_token_mean'
    """
    loss = _check_loss(_as_strategy(credit, config).policy_loss)
    if loss_agg_mode is None:
        loss_agg_mode = _get(config, "loss_agg_mode") or VERL_ACTOR_DEFAULTS["loss_agg_mode"]
    if not isinstance(loss, _FOLLOWS_ACTOR):
        aggregation = getattr(loss, "aggregation", None)
        if aggregation is not None and loss_agg_mode != _VERL_MODES.get(aggregation):
            _warn_once(
                f"rlcredit: the strategy's {type(loss).__name__} aggregates with {aggregation!r} but the actor's "
                f"loss_agg_mode is {loss_agg_mode!r}; the policy loss follows the strategy, verl's entropy/KL terms "
                f"follow loss_agg_mode. Set actor.loss_agg_mode={_VERL_MODES.get(aggregation)} to match."
            )
        return loss
    # Explicit = different from the clipped surrogate's defaults: a `gspo` loss is a clipped surrogate
    # that sets GSPO's clip range and aggregation, as the `dapo` preset sets its clip_high.
    fields = {f.name for f in attrs.fields(type(loss))}
    defaults = {f.name: f.default for f in attrs.fields(ClippedSurrogate) if f.name in fields}
    overrides: dict[str, Any] = {}
    sources: list[str] = []
    for name, (value, key) in _actor_values(config, loss_agg_mode).items():
        if name not in defaults:
            continue
        ours = getattr(loss, name)
        if ours == defaults[name]:  # not set by the strategy: verl's value runs
            if name == "aggregation" and value not in _VERL_MODES:
                raise SpecError(
                    f"verl's actor.loss_agg_mode={loss_agg_mode!r} has no rlcredit aggregation; set it to one of "
                    f"{', '.join(map(repr, AGG_MODES))}, or set the strategy's aggregation explicitly."
                )
            if value != ours:
                overrides[name] = value
                sources.append(f"actor.{key}={loss_agg_mode if name == 'aggregation' else value!r} -> {name}")
        elif ours != value:
            shown = loss_agg_mode if name == "aggregation" else value
            extra = " (verl aggregates its entropy and KL terms with its own)" if name == "aggregation" else ""
            _warn_once(
                f"rlcredit: the strategy sets {name}={ours!r} but the actor config has {key}={shown!r}; the "
                f"strategy's value runs in the policy loss{extra}. Set actor.{key} to match, or leave {name} at its "
                f"default ({defaults[name]!r}) to follow verl."
            )
    length, factor = getattr(loss, "max_length", None), _get(config, "loss_scale_factor")
    if length is not None and factor is not None and length != factor:
        _warn_once(
            f"rlcredit: the strategy sets max_length={length} but the actor config has loss_scale_factor={factor}; "
            f"the strategy's value runs in the policy loss. Set actor.loss_scale_factor={length} to match."
        )
    try:
        return attrs.evolve(loss, **overrides)
    except (SpecError, ValueError, TypeError) as err:
        raise SpecError(
            f"verl's actor config gives the rlcredit loss a value it rejects ({', '.join(sources)}): {err} Fix the "
            f"actor config, or set the value explicitly in the strategy."
        ) from err
