"""Which strategy verl runs, and where in verl its credit can be computed."""

from __future__ import annotations

import json
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any

from rlcredit.errors import SpecError
from rlcredit.requirements import FIELDS
from rlcredit.specs import build
from rlcredit.strategy import Strategy

__all__ = ["NAME", "STRATEGY_ENV", "CONFIG_KEY", "AGG_MODES", "resolve_strategy", "credit_location"]

NAME = "rlcredit"
"""The name of the policy loss and of the advantage estimator in verl's registries."""
STRATEGY_ENV = "RLCREDIT_STRATEGY"
"""Environment variable naming the strategy: a preset name, a spec file path or a JSON spec."""
CONFIG_KEY = "rlcredit_strategy"
"""Config key (in the actor or algorithm config, or its ``policy_loss`` section) naming the strategy."""

AGG_MODES: Mapping[str, str] = {
    "token-mean": "token_mean",
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-sum-norm": "seq_mean_token_sum_norm",
}
"""verl ``loss_agg_mode`` -> rlcredit aggregation (verl's ``token-sum`` has no rlcredit equivalent)."""

_VERL_MODES = {ours: theirs for theirs, ours in AGG_MODES.items()}
_CACHE: dict[str, Strategy] = {}


# --- strategy resolution -----------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """OmegaConf/dataclass containers to plain dicts and lists (configs are data)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _config_spec(config: Any) -> Any:
    if config is None:
        return None
    for section in (config, _get(config, "policy_loss")):
        value = _get(section, CONFIG_KEY)
        if value is not None:
            return _plain(value)
    return None


def _get(config: Any, key: str) -> Any:
    if config is None:
        return None
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(key, None)
        except Exception:  # noqa: BLE001 - a structured config may raise on unknown keys
            return None
    return getattr(config, key, None)


def resolve_strategy(config: Any = None) -> Strategy:
    """The strategy named by ``config[CONFIG_KEY]`` (or its ``policy_loss`` section), else ``$RLCREDIT_STRATEGY``.

    A value is a preset name (``"entropy_forks"``), a path to a JSON/YAML/TOML spec, a JSON spec
    string (``'{"weighter": ...}'``) or a spec dict (from a config). Built strategies are cached by
    spec, so the per-micro-batch loss does not rebuild them.

    Args:
        config: verl's actor or algorithm config (any mapping-like object), or None.

    Returns:
        The ``rlcredit.Strategy``.

    Raises:
        SpecError: no strategy named anywhere, or a bad spec. RegistryError: an unknown name.

    Examples:
        >>> from rlcredit.integrations.verl import resolve_strategy
        >>> resolve_strategy({"rlcredit_strategy": "dr_grpo"}).policy_loss.aggregation
        'seq_mean_token_sum_norm'
    """
    spec = _config_spec(config)
    if spec is None:
        spec = os.environ.get(STRATEGY_ENV, "").strip() or None
        if isinstance(spec, str) and spec.startswith("{"):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as err:
                raise SpecError(f"${STRATEGY_ENV} looks like a JSON spec but does not parse: {err}.") from err
    if spec is None:
        raise SpecError(
            f"no rlcredit strategy is named: set the environment variable {STRATEGY_ENV} (a preset name such as "
            f"'grpo' or 'entropy_forks', a spec file path or a JSON spec) in the driver and the Ray workers, or "
            f"put {CONFIG_KEY}=... in a dict-style actor/algorithm config."
        )
    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = build(spec)
    return _CACHE[key]


def _as_strategy(credit: Any, config: Any = None) -> Strategy:
    if credit is None:
        return resolve_strategy(config)
    return credit if isinstance(credit, Strategy) else build(credit)


def credit_location(credit: Any = None) -> str:
    """Where a strategy's ``assign`` can run inside verl.

    - ``"advantage_estimator"``: it needs only rewards, the response mask and group ids, so the
      registered estimator does everything (``grpo``, ``dapo``, ``dr_grpo``).
    - ``"batch"``: it also reads per-token tensors verl already computes (old log-probs,
      reference log-probs, entropies): call ``apply_credit`` on the batch, no model needed
      (``entropy_forks``, ``stapo``).
    - ``"worker"``: it needs the model (a second forward, attention capture): call
      ``apply_credit`` with ``model=`` in the actor worker (``vppo``, ``vppo_paper``, ``at_rl``).

    Args:
        credit: a preset name, spec or ``rlcredit.Strategy`` (None: ``resolve_strategy``).

    Returns:
        ``"advantage_estimator"``, ``"batch"`` or ``"worker"``.

    Examples:
        >>> from rlcredit.integrations.verl import credit_location
        >>> credit_location("dr_grpo"), credit_location("stapo"), credit_location("at_rl")
        ('advantage_estimator', 'batch', 'worker')
    """
    strategy = _as_strategy(credit)
    reqs = strategy.requirements
    if all(req.met(_ESTIMATOR_VIEW, None) for req in reqs):
        return "advantage_estimator"
    if all(req.met(_BATCH_VIEW, None) for req in reqs):
        return "batch"
    return "worker"


def _view(*fields: str, signals: tuple[str, ...] = ()) -> Any:
    """A stand-in rollout with the given optional fields set: what a requirement can find at a location."""
    values = {f: (True if f in fields else None) for f in FIELDS}
    return types.SimpleNamespace(signals=dict.fromkeys(signals, True), **values)


# verl's advantage estimator sees rewards, the response mask and group ids; its batch also holds
# old and reference log-probs, the actor's entropies and the sampled token ids.
_ESTIMATOR_VIEW = _view()
_BATCH_VIEW = _view("old_logprobs", "ref_logprobs", "response_ids", signals=("entropy",))
