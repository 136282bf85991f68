"""AT-RL cross-modal attention connectivity, captured while the model runs with sdpa.

AT-RL (Jiao et al., arXiv 2602.11455) scores each generated token by its "cross-modal attention
connectivity": the attention weight it places on visual tokens, with attention sinks debiased. The
layers, heads and debiasing rule are not published; what this module computes is **our
operationalisation** (METHODS.md, AT-RL), every constant a parameter.

How it is captured. The estimator registers an attention function with transformers'
``AttentionInterface`` (and the matching ``sdpa`` mask function with ``AttentionMaskInterface``)
and switches the language model's attention implementation to it for the duration of one call.
The function receives each layer's queries and keys *after* the rotary embedding (Qwen's 3-D
mRoPE included), the causal + padding mask, and ``module.layer_idx``; on the chosen layers it
computes, for the response query rows only and one block of rows at a time, the softmax over
all keys and keeps the head-averaged probabilities on image keys (``[b, T, I]``); then every layer
delegates to ``sdpa``, so the forward itself is the ordinary one. No model code is patched, no
``[T, T]`` map is held for more than one layer and one row chunk, and nothing is captured on the
other layers. The original attention implementation is restored afterwards, even on error.

Consequences: during the call the language model runs sdpa whatever its configured implementation
(eager, flash-attention), and the model must not run elsewhere concurrently (its config is
switched for the call). The softmax at image keys is computed in float32, base 2
(``p_v = 2^(l_v - m) / sum_j 2^(l_j - m)``, the scale times ``log2 e`` folded into the queries):
the same value as the natural-base softmax, at a fraction of ``exp``'s cost on CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

from rlcredit.requirements import POLICY, Field
from rlcredit.validators import in_range, int_at_least, is_bool, one_of, to_number
from rlcredit.errors import AdapterError, RolloutError, SpecError
from rlcredit.registry import register
from rlcredit.rollout import EstimatorOutput, Rollout
from rlcredit_mm._attention_maths import _layer_connectivity

__all__ = ["AttentionConnectivity", "default_layers"]

CAPTURE_IMPLEMENTATION = "rlcredit_connectivity"
"""The name under which the capturing attention function is registered with transformers."""

_STATE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar("rlcredit_connectivity", default=None)


# ---------------------------------------------------------------------------------------------
# The attention function transformers calls on every layer while a capture is active


def _capture_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       *args: Any, **kwargs: Any) -> tuple[Tensor, Any]:
    """Record the chosen layers' attention statistics, then run ordinary sdpa attention on every layer."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _STATE.get()
    if state is not None:
        state.record(module, query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def _register_with_transformers() -> None:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
    # The language model builds its 4-D mask with the function registered under its implementation
    # name; sdpa's mask (None for a plain causal mask without padding) is what sdpa then receives.
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


_register_with_transformers()


# ---------------------------------------------------------------------------------------------
# Per-call state: what the attention function needs to know about the current row chunk


@attrs.define(eq=False)
class _Capture:
    """Accumulates ``sum_l c_l``, ``sum_l density_l`` and ``sum_l profile_l`` over the chosen layers."""

    slots: dict[int, int]  # id(attention module) -> position in the chosen layers
    estimator: AttentionConnectivity
    # set per row chunk by begin():
    rows: slice = slice(0, 0)
    response_mask: Tensor | None = None  # [b, T] bool
    image_index: Tensor | None = None  # [b, I] int64 key positions of image tokens (padded with 0)
    image_valid: Tensor | None = None  # [b, I] bool
    image_bins: Tensor | None = None  # [b, I, K] float one-hot profile bin of each image token
    sink_index: Tensor | None = None  # [b, F] int64 leading valid keys dropped as sinks
    seen: set[int] = attrs.field(factory=set)
    mass: Tensor | None = None
    density: Tensor | None = None
    profile: Tensor | None = None

    def begin(self, image_mask: Tensor, attention_mask: Tensor | None, response_mask: Tensor, width: int) -> None:
        """Set up a row chunk; ``width`` (>= its largest image-token count, >= 1) sizes the ``[b, I]`` buffers.

        The width comes from the caller's host-side count, so nothing here waits for the device;
        columns beyond a row's own image tokens are marked invalid and contribute nothing.
        """
        est = self.estimator
        b, L = image_mask.shape
        T = response_mask.shape[1]
        start = L - T - 1 if est.align == "predicting" else L - T
        self.rows = slice(start, start + T)
        self.response_mask = response_mask
        device = image_mask.device
        # Leading sink keys: the first valid (non-padding) keys, so left padding is skipped.
        if attention_mask is not None:
            first = attention_mask.long().argmax(dim=1)
        else:
            first = torch.zeros(b, dtype=torch.long, device=device)
        F = est.sink_first_keys if est.debias_sinks else 0
        self.sink_index = (first[:, None] + torch.arange(F, device=device)).clamp_max(L - 1)
        pos = torch.arange(L, device=device)
        is_sink = torch.zeros(b, L, dtype=torch.bool, device=device)
        if F:
            is_sink = (pos >= first[:, None]) & (pos < first[:, None] + F)
        img = image_mask & ~is_sink
        if attention_mask is not None:
            img &= attention_mask.bool()
        count = img.sum(1)
        order = torch.argsort((~img).to(torch.int8), dim=1, stable=True)[:, : min(width, L)]
        self.image_index = order
        self.image_valid = img.gather(1, order)
        ordinal = torch.arange(order.shape[1], device=device).expand_as(order)
        bins = ordinal * est.profile_bins // count.clamp_min(1)[:, None]
        self.image_bins = torch.nn.functional.one_hot(bins.clamp_max(est.profile_bins - 1), est.profile_bins).float()
        self.image_bins *= self.image_valid[:, :, None]
        self.seen = set()
        self.mass = torch.zeros(b, T, device=device)
        self.density = torch.zeros(b, T, device=device)
        self.profile = torch.zeros(b, T, est.profile_bins, device=device)

    def record(self, module: Any, query: Tensor, key: Tensor, mask: Tensor | None,
               scaling: float | None, softcap: float | None) -> None:
        slot = self.slots.get(id(module))
        if slot is None or self.mass is None:
            return
        if query.shape[2] != key.shape[2]:
            raise AdapterError(
                f"attention_connectivity: layer {getattr(module, 'layer_idx', '?')} got {query.shape[2]} queries for "
                f"{key.shape[2]} keys; the capture needs one full forward without a KV cache."
            )
        self.seen.add(slot)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        mass, density, profile = _layer_connectivity(self, query, key, mask, scale, softcap)
        self.mass += mass
        self.density += density
        self.profile += profile

    def finish(self, n_layers: int) -> tuple[Tensor, Tensor, Tensor]:
        if len(self.seen) != n_layers:
            raise AdapterError(
                f"attention_connectivity captured {len(self.seen)} of the {n_layers} chosen layers; the model's "
                f"attention modules do not go through transformers' AttentionInterface, so this model is not "
                f"supported (register an adapter whose attention_modules(model) returns the decoder's attention modules)."
            )
        return self.mass / n_layers, self.density / n_layers, self.profile / n_layers


# ---------------------------------------------------------------------------------------------
# Model plumbing (through the policy's adapter when it provides the facts)


def _attention_modules(model: Any, adapter: Any) -> list[Any]:
    fn = getattr(adapter, "attention_modules", None)
    if fn is not None:
        return list(fn(model))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise AdapterError(
            f"attention_connectivity cannot find the decoder attention modules of {type(model).__name__}; give its "
            f"adapter an attention_modules(model) method returning them in layer order."
        )
    return [layer.self_attn for layer in layers]


def _image_token_mask(input_ids: Tensor, model: Any, adapter: Any) -> Tensor:
    fn = getattr(adapter, "image_token_mask", None)
    if fn is not None:
        return fn(input_ids, model.config).bool()
    config = model.config
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        raise AdapterError(
            f"attention_connectivity needs the image token id of {type(model).__name__} (config.image_token_id); "
            f"give its adapter an image_token_mask(input_ids, config) method."
        )
    return input_ids == token


@contextlib.contextmanager
def _capturing(model: Any, modules: Sequence[Any], chosen: Sequence[int], estimator: AttentionConnectivity
               ) -> Iterator[_Capture]:
    """Switch the language model's attention to the capturing function; restore it afterwards."""
    configs: dict[int, Any] = {}
    for m in modules:
        cfg = getattr(m, "config", None)
        if cfg is not None:
            configs[id(cfg)] = cfg
    get_text = getattr(model.config, "get_text_config", None)
    text = get_text(decoder=True) if get_text is not None else None
    if text is not None and text is not model.config:
        configs[id(text)] = text
    if not configs:
        raise AdapterError(
            f"attention_connectivity: the attention modules of {type(model).__name__} have no .config, so their "
            f"attention implementation cannot be switched; this model is not supported."
        )
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs.values()]
    state = _Capture(slots={id(modules[i]): j for j, i in enumerate(chosen)}, estimator=estimator)
    token = _STATE.set(state)
    try:
        for cfg, _ in saved:
            cfg._attn_implementation_internal = CAPTURE_IMPLEMENTATION
        yield state
    finally:
        for cfg, impl in saved:
            cfg._attn_implementation_internal = impl
        _STATE.reset(token)


def default_layers(n_layers: int, count: int = 4) -> tuple[int, ...]:
    """``count`` layers evenly spaced over the upper half ``[n // 2, n - 1]`` (our AT-RL default).

    Args:
        n_layers: decoder layers ``L`` of the language model.
        count: how many layers (fewer when the upper half is smaller).

    Returns:
        Sorted distinct layer indices.

    Examples:
        >>> default_layers(16), default_layers(2), default_layers(28)
        ((8, 10, 13, 15), (1,), (14, 18, 23, 27))
    """
    lo, hi = n_layers // 2, n_layers - 1
    if count == 1:
        return (hi,)
    picks = {round(lo + (hi - lo) * i / (count - 1)) for i in range(count)}
    return tuple(sorted(picks))


def _to_layers(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SpecError(f"AttentionConnectivity.layers must be None or a list of layer indices, got {value!r}.")
    out = tuple(value)
    if not out or any(isinstance(i, bool) or not isinstance(i, int) for i in out) or len(set(out)) != len(out):
        raise SpecError(
            f"AttentionConnectivity.layers must be a non-empty list of distinct ints (negative counts from the "
            f"last layer), got {value!r}."
        )
    return out


@register("estimator", "attention_connectivity")
@attrs.frozen
class AttentionConnectivity:
    """AT-RL cross-modal attention connectivity: each response token's attention mass on image tokens.

    AT-RL (Jiao et al., arXiv 2602.11455) defines connectivity as the "aggregate attention weight a
    generated text token places on visual patches", attention sinks debiased. Ours (METHODS.md):

    ``c_t = mean_{l in layers} [ sum_{v in image \\ S_l} abar^l_{q(t), v} / (1 - sum_{u in S_l} abar^l_{q(t), u}) ]``

    where ``abar^l`` is layer ``l``'s attention averaged over heads (softmax of post-rotary
    ``q k^T * scaling`` under the causal + padding mask), ``q(t)`` the aligned query column and
    ``S_l`` the sinks: the first ``sink_first_keys`` valid keys and the image keys whose mean
    received attention over the valid response rows is above the ``sink_quantile`` quantile of the
    sequence's image keys. ``measure="density"`` gives ``c_t / (|image| / |context|)`` (visible,
    non-sink keys of that query), 1 for attention spread evenly. The ``profile`` extra,
    ``[B, T, K]``, is the same debiased attention summed into ``K = profile_bins`` consecutive
    groups of the sequence's image tokens, averaged over layers (what ``anchor_clusters`` clusters on).

    The model runs one ordinary forward (rows ``policy.rows_per_chunk`` at a time) while an
    attention function registered with transformers' ``AttentionInterface`` records the chosen
    layers and delegates every layer to sdpa; see the module docstring.

    Args:
        layers: decoder layer indices (negative from the end); None: ``auto_layers`` evenly spaced
            over the upper half (``default_layers``).
        debias_sinks: drop sink keys and renormalise (else the raw mass on image keys).
        measure: ``"mass"`` (``c_t``) or ``"density"``.
        align: ``"predicting"``: the query at the position whose logits give ``log pi(y_t)``
            (column ``P+t-1``); ``"self"``: the query at ``y_t`` itself (column ``P+t``).
        profile_bins: ``K``, pooled image groups in the profile.
        sink_quantile: image keys whose mean received attention is above this quantile are sinks.
        sink_first_keys: leading valid keys treated as sinks (0: none).
        auto_layers: how many layers ``layers=None`` picks.
        query_chunk: response query rows per softmax block (memory ``~ b * heads * query_chunk * (P+T)``);
            None: as many as fit 256 MiB on GPUs, 16 MiB on CPU (``rlcredit.functional._chunking``).

    Returns:
        ``EstimatorOutput(score [B, T] float32, extras={"profile": [B, T, K] float32})``, 0 on padding.

    Examples:
        >>> import torch, rlcredit, transformers as tf
        >>> from rlcredit_mm import AttentionConnectivity
        >>> cfg = tf.LlavaConfig(
        ...     vision_config=tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                                       num_attention_heads=2, image_size=28, patch_size=14),
        ...     text_config=tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                                num_attention_heads=2, num_key_value_heads=1),
        ...     image_token_index=63, image_seq_length=4)
        >>> _ = torch.manual_seed(0)
        >>> policy = rlcredit.HFPolicy(tf.LlavaForConditionalGeneration(cfg).eval())
        >>> ids = torch.tensor([[1, 63, 63, 63, 63, 5, 6, 7, 8, 9]])  # prompt with 4 image tokens, 4 response tokens
        >>> rollout = rlcredit.Rollout(torch.ones(1, 4, dtype=torch.bool), torch.ones(1), torch.zeros(1, dtype=torch.long),
        ...     model_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids),
        ...                   "pixel_values": torch.randn(1, 3, 28, 28)})
        >>> out = AttentionConnectivity(layers=[-1], profile_bins=2)(rollout, policy)
        >>> out.score.shape, out.extras["profile"].shape
        (torch.Size([1, 4]), torch.Size([1, 4, 2]))
        >>> bool(((out.score > 0) & (out.score < 1)).all()), torch.allclose(out.extras["profile"].sum(-1), out.score)
        (True, True)
    """

    layers: tuple[int, ...] | None = attrs.field(default=None, converter=_to_layers)
    debias_sinks: bool = attrs.field(default=True, validator=is_bool)
    measure: str = attrs.field(default="mass", validator=one_of("mass", "density"))
    align: str = attrs.field(default="predicting", validator=one_of("predicting", "self"))
    profile_bins: int = attrs.field(default=16, converter=to_number, validator=int_at_least(1))
    sink_quantile: float = attrs.field(default=0.99, converter=to_number, validator=in_range(0.0, 1.0))
    sink_first_keys: int = attrs.field(default=1, converter=to_number, validator=int_at_least(0))
    auto_layers: int = attrs.field(default=4, converter=to_number, validator=int_at_least(1))
    query_chunk: int | None = attrs.field(default=None, converter=to_number,
                                          validator=attrs.validators.optional(int_at_least(1)))

    requires = (POLICY, Field("model_inputs"))
    extras = ("profile",)

    def chosen_layers(self, n_layers: int) -> tuple[int, ...]:
        """The layer indices used for a language model with ``n_layers`` decoder layers."""
        if self.layers is None:
            return default_layers(n_layers, self.auto_layers)
        bad = [i for i in self.layers if not -n_layers <= i < n_layers]
        if bad:
            raise SpecError(
                f"AttentionConnectivity.layers {list(self.layers)}: {bad} out of range for a model with "
                f"{n_layers} decoder layers (use 0..{n_layers - 1} or negative indices)."
            )
        chosen = sorted({i % n_layers for i in self.layers})
        if len(chosen) != len(self.layers):
            raise SpecError(f"AttentionConnectivity.layers {list(self.layers)} name the same layer twice.")
        return tuple(chosen)

    def __call__(self, rollout: Rollout, policy: Any = None) -> EstimatorOutput:
        if policy is None or rollout.model_inputs is None:
            raise RolloutError(
                "attention_connectivity needs a policy (rlcredit.HFPolicy(model)) and rollout.model_inputs "
                "(input_ids [B, P+T], attention_mask, pixel inputs) to run the model; pass both to strategy.assign."
            )
        model = policy.model
        adapter = policy.adapter
        mask = rollout.response_mask
        B, T = mask.shape
        inputs = dict(rollout.model_inputs)
        if "input_ids" not in inputs:
            raise RolloutError("attention_connectivity: rollout.model_inputs must contain input_ids [B, P+T].")
        ids = inputs["input_ids"]
        need = T + 1 if self.align == "predicting" else T
        if ids.ndim != 2 or ids.shape[0] != B or ids.shape[1] < need:
            raise RolloutError(
                f"attention_connectivity: input_ids must be [B, P+T] with B = {B} and P+T >= {need} "
                f"(align={self.align!r}), got {list(ids.shape)}."
            )
        if adapter is not None and hasattr(adapter, "prepare_inputs"):
            inputs = adapter.prepare_inputs(inputs, model)
        modules = _attention_modules(model, adapter)
        chosen = self.chosen_layers(len(modules))
        device = policy.device
        dmask = mask.to(device)
        backbone = getattr(model, "model", None)
        backbone = model if backbone is None else backbone
        score = torch.zeros(B, T, device=device)
        profile = torch.zeros(B, T, self.profile_bins, device=device)
        # Image tokens per row, counted where the ids live (on the host, as rollouts keep them: no
        # device sync; a single one for the whole batch when they are on the GPU): each row
        # chunk's [b, I] buffers are sized from it, so the forwards below never wait for the device.
        counts = _image_token_mask(inputs["input_ids"], model, adapter).sum(1).tolist()
        with torch.no_grad(), _capturing(model, modules, chosen, self) as state:
            for start in range(0, B, policy.rows_per_chunk):
                rows = slice(start, min(B, start + policy.rows_per_chunk))
                chunk = policy.slice_rows(inputs, rows)
                chunk = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in chunk.items()}
                img = _image_token_mask(chunk["input_ids"], model, adapter).to(device)
                state.begin(img, chunk.get("attention_mask"), dmask[rows], width=max(1, *counts[rows]))
                backbone(**chunk, use_cache=False)
                mass, density, prof = state.finish(len(chosen))
                m = dmask[rows]
                score[rows] = torch.where(m, mass if self.measure == "mass" else density, 0.0)
                profile[rows] = torch.where(m[:, :, None], prof, 0.0)
        return EstimatorOutput(score=score, extras={"profile": profile})
