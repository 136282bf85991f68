"""The data model: ``Rollout`` in, ``Credit`` out, ``LossOutput`` from the loss.

All three are frozen attrs classes validated on construction, so a wrong shape, dtype, device or a
non-finite value fails here, naming the field, instead of deep inside a kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs
import torch
from torch import Tensor

from rlcredit._rows import Rows, describe, row_index
from rlcredit.errors import RolloutError
from rlcredit.functional._checks import FLOAT32_MAX, check_weights, ensure, storage_problem

__all__ = ["Rollout", "Credit", "LossOutput", "EstimatorOutput", "Rows"]


def _frozen_mapping(value: Mapping[str, Any] | None, where: str = "a mapping field") -> Mapping[str, Any]:
    if isinstance(value, LazyMetrics):
        return value
    if value is not None and not isinstance(value, Mapping):
        raise RolloutError(
            f"{where} must be a mapping name -> tensor (e.g. {{'entropy': tensor}}), got {type(value).__name__}."
        )
    return MappingProxyType(dict(value or {}))


def _mapping(where: str):
    """The converter of one mapping field: read-only, with an error that names the field."""
    return lambda value: _frozen_mapping(value, where)


class LazyMetrics(Mapping):
    """A read-only mapping of metric name -> detached tensor, each computed on first access.

    Metrics cost full passes over ``[B, T]`` tensors; a training step that logs none of them
    should not pay for them. Each value is computed once (under ``no_grad``) and cached.

    Examples:
        >>> import torch
        >>> from rlcredit.rollout import LazyMetrics
        >>> m = LazyMetrics({"mean": lambda: torch.tensor([1.0, 3.0]).mean()})
        >>> m["mean"], list(m)
        (tensor(2.), ['mean'])
    """

    def __init__(self, thunks: Mapping[str, Any]) -> None:
        self._thunks = dict(thunks)
        self._values: dict[str, Tensor] = {}

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._values:
            thunk = self._thunks[key]
            with torch.no_grad():
                self._values[key] = thunk().detach() if callable(thunk) else thunk
        return self._values[key]

    def __iter__(self):
        return iter(self._thunks)

    def __len__(self) -> int:
        return len(self._thunks)

    def __repr__(self) -> str:
        return f"LazyMetrics({sorted(self._thunks)})"


def _optional_frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    if value is not None and not isinstance(value, Mapping):
        raise RolloutError(
            f"Rollout.model_inputs must be a mapping (the model's keyword arguments, e.g. {{'input_ids': ..., "
            f"'attention_mask': ...}}) or None, got {type(value).__name__}."
        )
    return None if value is None else MappingProxyType(dict(value))


def _float_rewards(rewards: Any) -> Any:
    """0/1 correctness rewards often arrive as int or bool tensors: read them as float32."""
    if isinstance(rewards, Tensor) and (rewards.dtype == torch.bool or not (rewards.dtype.is_floating_point
                                                                           or rewards.dtype.is_complex)):
        return rewards.float()
    return rewards


def _check_tensor(owner: str, name: str, x: Any, *, shape: tuple, device: torch.device | None,
                  kind: str, finite: bool = True, trailing: bool = False) -> None:
    """Raise RolloutError unless ``x`` is a dense tensor of ``shape`` (leading dims if ``trailing``) and ``kind``.

    ``kind`` is ``"bool"``, ``"int"``, ``"float"`` or ``"any"`` (any real dtype). Float values
    must be finite in float32 (see ``_check_finite``).
    """
    if not isinstance(x, Tensor):
        raise RolloutError(f"{owner}.{name} must be a torch.Tensor of shape {list(shape)}, got {describe(x)}.")
    problem = storage_problem(x)
    if problem is not None:
        raise RolloutError(f"{owner}.{name} {problem}.")
    actual = tuple(x.shape)
    ok = actual[: len(shape)] == shape if trailing else actual == shape
    if not ok:
        want = f"{list(shape)} (+ optional trailing dims)" if trailing else f"{list(shape)}"
        raise RolloutError(
            f"{owner}.{name} has shape {list(actual)}, expected {want} "
            f"(B rows, T response tokens, right-padded)."
        )
    if kind == "bool" and x.dtype != torch.bool:
        raise RolloutError(f"{owner}.{name} must be torch.bool, got {x.dtype}; convert with `.bool()`.")
    if kind == "int" and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise RolloutError(f"{owner}.{name} must be an integer tensor (int64), got {x.dtype}; convert with `.long()`.")
    if kind == "float" and not x.dtype.is_floating_point:
        raise RolloutError(f"{owner}.{name} must be a floating tensor, got {x.dtype}; convert with `.float()`.")
    if x.dtype.is_complex:
        raise RolloutError(f"{owner}.{name} must hold real values, got {x.dtype}; pass `.real` or `.abs()`.")
    if device is not None and x.device != device:
        raise RolloutError(
            f"{owner}.{name} is on {x.device} but the rest of the rollout is on {device}; move it with `.to({str(device)!r})`."
        )
    if finite and x.dtype.is_floating_point:
        _check_finite(f"{owner}.{name}", x)


def _check_finite(where: str, x: Tensor) -> None:
    """The one value rule of float inputs: finite in float32, where every computation runs.

    float64 values beyond float32's range (``|x| > 3.4e38``) would turn into ``inf`` there, so
    they are rejected like NaN and inf; narrower dtypes only need ``isfinite``.
    """
    if x.dtype.itemsize > 4:
        ok = x.abs() <= FLOAT32_MAX  # False for NaN too
        what = f"NaN, inf, or beyond float32's range |x| <= {FLOAT32_MAX:.4g} where rlcredit computes: rescale them"
    else:
        ok = torch.isfinite(x)
        what = "NaN or inf"
    ensure(ok.all(), lambda: (
        f"{where} contains {int((~ok).sum())} non-finite value(s) ({what}); every entry must be finite, padding "
        f"positions included (fill them with 0)."))


@attrs.frozen(eq=False)
class Rollout:
    """One batch of sampled responses: what every credit strategy reads.

    Shapes use ``B`` rows (rollouts), ``T`` response tokens (right-padded), ``P`` prompt tokens.

    Args:
        response_mask: ``[B, T]`` bool, True on valid response tokens (right-padded).
        rewards: ``[B]``, one scalar reward per rollout (int and bool rewards are read as float32).
        group_ids: ``[B]`` int64; rollouts of the same prompt share an id (any integers).
        old_logprobs: ``[B, T]`` float or None, log-probs of the sampled tokens under the
            behaviour policy. None means on-policy: losses then use the current log-probs, detached.
        ref_logprobs: ``[B, T]`` float or None, log-probs under a reference policy (KL penalty).
        signals: named per-token inputs computed elsewhere, each ``[B, T]`` (or ``[B, T, ...]``),
            e.g. ``"entropy"``, ``"aug_logprobs"`` (log-probs with the perturbed image),
            ``"connectivity"``.
        model_inputs: what the model was called with (TRL/verl layout: ``input_ids [B, P+T]`` whose
            last ``T`` columns are the response, ``attention_mask``, pixel tensors...), or None.
        response_ids: ``[B, T]`` int64 or None, the sampled token ids of the responses (the
            integrations fill it), for estimators that read the text (``token_match``).

    Every field is validated on construction: shapes, dtypes, one device, dense tensors with
    values (not sparse, not meta), values finite in float32 (padding included; float64 values
    beyond ``3.4e38`` are refused, as the maths runs in float32), non-negative integer token ids.
    A bad field raises ``rlcredit.RolloutError`` naming it.

    Examples:
        >>> import torch, rlcredit
        >>> r = rlcredit.Rollout(
        ...     response_mask=torch.tensor([[True, True, False], [True, False, False]]),
        ...     rewards=torch.tensor([1.0, 0.0]),
        ...     group_ids=torch.tensor([0, 0]),
        ... )
        >>> r.batch_size, r.response_length
        (2, 3)
        >>> r.select([1]).rewards
        tensor([0.])
    """

    response_mask: Tensor
    rewards: Tensor = attrs.field(converter=lambda r: _float_rewards(r))
    group_ids: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    signals: Mapping[str, Tensor] = attrs.field(factory=dict, converter=_mapping("Rollout.signals"))
    model_inputs: Mapping[str, Any] | None = attrs.field(default=None, converter=_optional_frozen_mapping)
    response_ids: Tensor | None = None

    def __attrs_post_init__(self) -> None:
        mask = self.response_mask
        _check_tensor("Rollout", "response_mask", mask, shape=tuple(getattr(mask, "shape", ())),
                      device=None, kind="bool")
        if mask.ndim != 2:
            raise RolloutError(f"Rollout.response_mask must be 2-D [B, T], got shape {list(mask.shape)}.")
        B, T = mask.shape
        if B == 0:
            raise RolloutError("Rollout has no rows (B = 0); pass at least one rollout.")
        dev = mask.device
        _check_tensor("Rollout", "rewards", self.rewards, shape=(B,), device=dev, kind="float")
        _check_tensor("Rollout", "group_ids", self.group_ids, shape=(B,), device=dev, kind="int")
        for name in ("old_logprobs", "ref_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_tensor("Rollout", name, value, shape=(B, T), device=dev, kind="float")
        if self.response_ids is not None:
            ids = self.response_ids
            _check_tensor("Rollout", "response_ids", ids, shape=(B, T), device=dev, kind="int")
            ensure((ids >= 0).all(), lambda: "Rollout.response_ids holds negative token ids; token ids are >= 0 "
                                             "(fill padding with 0 or the pad token id).")
        for key, value in self.signals.items():
            if not isinstance(key, str):
                raise RolloutError(f"Rollout.signals keys must be strings, got {key!r}.")
            _check_tensor("Rollout", f"signals[{key!r}]", value, shape=(B, T), device=dev, kind="any", trailing=True)
        if self.model_inputs is not None:
            self._check_model_inputs(B, T)

    def _check_model_inputs(self, B: int, T: int) -> None:
        """Keys are strings; ``input_ids`` (when given) is a dense ``[B, P+T]`` integer tensor of token ids >= 0."""
        for key in self.model_inputs:
            if not isinstance(key, str):
                raise RolloutError(f"Rollout.model_inputs keys must be the model's argument names (strings), got {key!r}.")
        ids = self.model_inputs.get("input_ids")
        if ids is None:
            return
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.shape[0] != B or ids.shape[1] < T:
            raise RolloutError(
                f"Rollout.model_inputs['input_ids'] must be [B, P+T] = [{B}, >= {T}] with the response "
                f"in the last T columns, got {describe(ids)}."
            )
        _check_tensor("Rollout", "model_inputs['input_ids']", ids, shape=tuple(ids.shape), device=None, kind="int")
        ensure((ids >= 0).all(), lambda: "Rollout.model_inputs['input_ids'] holds negative token ids; token ids are "
                                         ">= 0 (fill padding with the pad token id, and mark it in attention_mask).")
        attn = self.model_inputs.get("attention_mask")
        if attn is not None and (not isinstance(attn, Tensor) or tuple(attn.shape) != tuple(ids.shape)):
            raise RolloutError(
                f"Rollout.model_inputs['attention_mask'] must match input_ids {list(ids.shape)}, "
                f"got {describe(attn)}."
            )

    @property
    def batch_size(self) -> int:
        """``B``, the number of rollouts."""
        return self.response_mask.shape[0]

    @property
    def response_length(self) -> int:
        """``T``, the padded response length."""
        return self.response_mask.shape[1]

    @property
    def device(self) -> torch.device:
        return self.response_mask.device

    @functools.cached_property
    def token_counts(self) -> Tensor:
        """``[B]`` int64 number of valid response tokens of each row, computed once.

        Examples:
            >>> import torch, rlcredit
            >>> r = rlcredit.Rollout(torch.tensor([[True, True, False], [True, False, False]]),
            ...                      torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
            >>> r.token_counts
            tensor([2, 1])
        """
        return self.response_mask.sum(-1)

    @functools.cached_property
    def float_mask(self) -> Tensor:
        """``[B, T]`` float32 ``response_mask`` (1.0 on valid tokens, 0.0 on padding), computed once.

        Shared by the components that weight by the mask (estimators, shapers, the loss): do not
        modify it in place. ``select`` gives a new rollout with its own.

        Examples:
            >>> import torch, rlcredit
            >>> r = rlcredit.Rollout(torch.tensor([[True, True, False]]), torch.tensor([1.0]), torch.tensor([0]))
            >>> r.float_mask
            tensor([[1., 1., 0.]])
        """
        return self.response_mask.float()

    def select(self, rows: Rows) -> Rollout:
        """The rollout restricted to ``rows`` (for mini/micro-batches of the loss).

        ``rows`` follows one rule (``Credit.select`` too): integer indices in ``[0, B)`` (a
        tensor, NumPy array, list or range; repeats allowed), a bool mask of length ``B`` (a
        tensor, NumPy array or list: ``[True, False, True]`` picks rows 0 and 2), or a slice; an
        empty selection, a negative or out-of-range index, floats, or a bare int raise
        ``RolloutError``.
        ``model_inputs`` are dropped (set to None): their layout is architecture-specific (Qwen's
        flattened image patches have no row axis) and the loss never needs them. Run
        ``Strategy.assign`` on the full rollout, then ``select`` for the loss.

        Examples:
            >>> import torch, rlcredit
            >>> r = rlcredit.Rollout(torch.ones(3, 2, dtype=torch.bool), torch.tensor([1.0, 0.0, 2.0]),
            ...                      torch.tensor([0, 0, 1]))
            >>> r.select([2, 0]).rewards, r.select([True, False, True]).rewards
            (tensor([2., 1.]), tensor([1., 2.]))
        """
        idx = row_index(rows, self.batch_size, self.device)

        def take(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.index_select(0, idx)

        return Rollout(response_mask=take(self.response_mask), rewards=take(self.rewards),
                       group_ids=take(self.group_ids), old_logprobs=take(self.old_logprobs),
                       ref_logprobs=take(self.ref_logprobs), signals={k: take(v) for k, v in self.signals.items()},
                       model_inputs=None, response_ids=take(self.response_ids))


@attrs.frozen(eq=False)
class EstimatorOutput:
    """What an estimator returns when it produces auxiliary per-token data besides its score.

    Args:
        score: ``[B, T]`` float, the per-token score (0 on padding).
        extras: named auxiliary tensors with leading ``[B, T]`` (e.g. AT-RL attention profiles
            ``[B, T, K]``). The strategy stores them as ``f"{name}.{key}"`` among the scores.

    Examples:
        >>> import torch, rlcredit
        >>> out = rlcredit.EstimatorOutput(torch.zeros(2, 3), {"profile": torch.zeros(2, 3, 4)})
        >>> sorted(out.extras)
        ['profile']
    """

    score: Tensor
    extras: Mapping[str, Tensor] = attrs.field(factory=dict, converter=_mapping("EstimatorOutput.extras"))


@attrs.frozen(eq=False)
class Credit:
    """The output of credit assignment, computed once per rollout batch under ``no_grad``.

    Args:
        scores: named per-token scores ``[B, T]`` (and estimator extras ``[B, T, ...]``).
        token_weights: ``[B, T]`` float >= 0, exactly 0 on padding.
        advantages: ``[B]`` (per trajectory) or ``[B, T]`` (per token).
        metrics: detached scalar tensors for logging (no host sync).

    Examples:
        >>> import torch, rlcredit
        >>> c = rlcredit.Credit({}, torch.ones(2, 3), torch.tensor([1.0, -1.0]))
        >>> c.select([0]).advantages
        tensor([1.])
    """

    scores: Mapping[str, Tensor] = attrs.field(converter=_mapping("Credit.scores"))
    token_weights: Tensor
    advantages: Tensor
    metrics: Mapping[str, Tensor] = attrs.field(factory=dict, converter=_mapping("Credit.metrics"))

    def __attrs_post_init__(self) -> None:
        w = self.token_weights
        _check_tensor("Credit", "token_weights", w, shape=tuple(getattr(w, "shape", ())), device=None, kind="float",
                      finite=False)
        if w.ndim != 2:
            raise RolloutError(f"Credit.token_weights must be [B, T], got shape {list(w.shape)}.")
        B, T = w.shape
        # Scores first: a non-finite score is the root cause of non-finite weights or advantages.
        for key, value in self.scores.items():
            if not isinstance(key, str):
                raise RolloutError(f"Credit.scores keys must be score names (strings), got {key!r}.")
            _check_tensor("Credit", f"scores[{key!r}]", value, shape=(B, T), device=w.device, kind="any", trailing=True)
        _check_tensor("Credit", "token_weights", w, shape=(B, T), device=w.device, kind="float")
        check_weights("Credit.token_weights", w)
        adv = self.advantages
        if not isinstance(adv, Tensor) or tuple(adv.shape) not in ((B,), (B, T)):
            raise RolloutError(f"Credit.advantages must be [B] = [{B}] or [B, T] = [{B}, {T}], got {describe(adv)}.")
        _check_tensor("Credit", "advantages", adv, shape=tuple(adv.shape), device=w.device, kind="float")

    def select(self, rows: Rows) -> Credit:
        """The credit restricted to ``rows`` (the row rule of ``Rollout.select``); metrics are kept as they are.

        Examples:
            >>> import torch, rlcredit
            >>> c = rlcredit.Credit({}, torch.ones(3, 2), torch.tensor([1.0, -1.0, 0.5]))
            >>> c.select(torch.tensor([2, 0])).advantages
            tensor([0.5000, 1.0000])
        """
        idx = row_index(rows, self.token_weights.shape[0], self.token_weights.device)
        return Credit(scores={k: v.index_select(0, idx) for k, v in self.scores.items()},
                      token_weights=self.token_weights.index_select(0, idx),
                      advantages=self.advantages.index_select(0, idx), metrics=self.metrics)

    def token_advantages(self, mask: Tensor | None = None) -> Tensor:
        """``[B, T]`` float32 per-token advantages with the weights folded in: ``w_{i,t} * A_i``.

        Exact for ``w >= 0``: ``-min(rho A w, clip(rho) A w) = w * -min(rho A, clip(rho) A)``, so a
        trainer whose loss takes ``[B, T]`` advantages (TRL, verl) runs this credit unchanged.
        Credit from ``Strategy.assign`` is 0 on padding; pass the ``[B, T]`` bool ``mask`` to make
        it so for a hand-made credit too.

        Examples:
            >>> import torch, rlcredit
            >>> c = rlcredit.Credit({}, torch.tensor([[1.0, 0.0], [0.5, 2.0]]), torch.tensor([2.0, -1.0]))
            >>> c.token_advantages()
            tensor([[ 2.0000,  0.0000],
                    [-0.5000, -2.0000]])
        """
        adv = self.advantages.float()
        folded = self.token_weights.float() * (adv if adv.ndim == 2 else adv[:, None])
        if mask is None:
            return folded
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(folded.shape):
            raise RolloutError(f"Credit.token_advantages(mask): mask must be a [B, T] = {list(folded.shape)} bool "
                               f"tensor, got {describe(mask)}.")
        return torch.where(mask, folded, torch.zeros((), device=folded.device))


@attrs.frozen(eq=False)
class LossOutput:
    """What a ``rlcredit.losses.PolicyLoss`` returns.

    Args:
        loss: scalar tensor, differentiable w.r.t. the log-probs it was computed from.
        metrics: detached scalar tensors (``clip_fraction``, ``kept_fraction``, ...).

    Examples:
        >>> import torch, rlcredit
        >>> rlcredit.LossOutput(torch.tensor(0.5)).loss
        tensor(0.5000)
    """

    loss: Tensor
    metrics: Mapping[str, Tensor] = attrs.field(factory=dict, converter=_mapping("LossOutput.metrics"))

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.loss, Tensor) or self.loss.ndim != 0:
            raise RolloutError(f"LossOutput.loss must be a scalar tensor, got {describe(self.loss)}.")
