"""HFPolicy: per-response-token quantities from a transformers model, chunked over rows.

The whole batch's ``[B, T, V]`` logits never exist: rows go through the backbone
``rows_per_chunk`` at a time, only the response positions' last hidden states are kept, and the LM
head runs on ``tokens_per_chunk`` flattened valid positions at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from rlcredit.validators import int_at_least, to_number
from rlcredit.errors import AdapterError, RolloutError
from rlcredit.functional import selected_logprobs, token_entropy
from rlcredit.functional._checks import check_real, ensure, storage_problem

__all__ = ["HFPolicy", "TokenStats"]

InputTransform = Callable[[dict[str, Any], slice], dict[str, Any]]


@attrs.frozen(eq=False)
class TokenStats:
    """Per-response-token quantities; every tensor is ``[B, T]`` (``hidden``: ``[B, T, H]``), 0 on padding.

    Attributes:
        logprobs: ``log pi(y_t | ...)`` of the response tokens, float32.
        entropy: ``H_t`` of ``softmax(logits / temperature)``, float32, or None if not asked for.
        hidden: the last hidden state at the position whose logits predict ``y_t`` (model dtype),
            or None if not asked for.

    Examples:
        >>> import torch
        >>> from rlcredit.policy import TokenStats
        >>> TokenStats(logprobs=torch.zeros(2, 3)).entropy is None
        True
    """

    logprobs: Tensor | None
    entropy: Tensor | None = None
    hidden: Tensor | None = None


def _resolve_adapter(model: Any) -> Any:
    """The multimodal adapter for ``model``, or None for a text-only causal LM."""
    config = getattr(model, "config", None)
    if getattr(config, "vision_config", None) is None:
        return None
    from rlcredit.registry import available, get

    names = available("adapter")  # loads the plugins first
    for name in names:
        cls = get("adapter", name)
        matches = getattr(cls, "matches", None)
        if matches is not None and matches(config):
            return cls()
    supported = ", ".join(names) or "(none: pip install 'rlcredit[mm]')"
    raise AdapterError(
        f"no rlcredit adapter supports model_type {getattr(config, 'model_type', '?')!r}; supported: {supported}. "
        f"Register one with @rlcredit.register('adapter', NAME) (see rlcredit_mm.adapters) or pass HFPolicy(model, adapter=...)."
    )


@attrs.define(eq=False)
class HFPolicy:
    """A transformers causal LM or VLM as a source of per-response-token log-probs, entropy and hidden states.

    Inputs follow TRL and verl: ``model_inputs["input_ids"]`` is ``[B, P+T]`` and its last ``T``
    columns are the response; the logits at column ``j`` predict token ``j+1``, so ``y_t`` (column
    ``P+t``) is scored by the hidden state at column ``P+t-1``. The model is called with
    ``model_inputs`` as given (pass ``position_ids`` yourself if your trainer does).

    Rows are processed ``rows_per_chunk`` at a time and the LM head is applied to
    ``tokens_per_chunk`` valid positions at a time (chunks of 16-64 flattened rows are fastest on
    CPU), so at most ``[tokens_per_chunk, V]`` logits exist at once without grad.

    ``log pi(y_t) = log_softmax(z_t / temperature)[y_t]``,
    ``H_t = -sum_v p_v log p_v`` with ``p = softmax(z_t / temperature)``.

    Args:
        model: a ``transformers`` ``*ForCausalLM`` or ``*ForConditionalGeneration`` model with a
            ``.model`` backbone and an output embedding (LM head).
        rows_per_chunk: rows per backbone forward (>= 1).
        tokens_per_chunk: flattened response positions per LM-head chunk (>= 1).
        adapter: the ``rlcredit_mm`` adapter for VLMs (resolved from the model's config when None);
            it slices multimodal inputs by rows.

    Examples:
        >>> import torch
        >>> from transformers import Qwen2Config, Qwen2ForCausalLM
        >>> import rlcredit
        >>> cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> policy = rlcredit.HFPolicy(Qwen2ForCausalLM(cfg).eval(), rows_per_chunk=1)
        >>> ids = torch.randint(0, 64, (2, 7))
        >>> mask = torch.tensor([[True, True, True], [True, False, False]])
        >>> stats = policy.response_stats({"input_ids": ids}, mask, entropy=True)
        >>> stats.logprobs.shape, bool(stats.entropy[1, 1] == 0)
        (torch.Size([2, 3]), True)
    """

    model: Any
    rows_per_chunk: int = attrs.field(default=4, converter=to_number, validator=int_at_least(1))
    tokens_per_chunk: int = attrs.field(default=32, converter=to_number, validator=int_at_least(1))
    adapter: Any = None

    def __attrs_post_init__(self) -> None:
        head = getattr(self.model, "get_output_embeddings", None)
        if not isinstance(self.model, torch.nn.Module) or head is None or head() is None:
            raise AdapterError(
                f"HFPolicy needs a transformers model with an LM head (get_output_embeddings()), "
                f"got {type(self.model).__name__}."
            )
        if self.adapter is None:
            self.adapter = _resolve_adapter(self.model)

    # --- model facts -----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lm_head(self) -> tuple[Tensor, Tensor | None]:
        """``(weight [V, H], bias [V] | None)`` of the output embedding."""
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    @property
    def logit_softcap(self) -> float | None:
        """Gemma-style final logit soft-capping ``c`` (``z = c tanh(z / c)``), or None.

        Read from the top-level config only, as the models apply it: ``Gemma3ForCausalLM`` caps
        (its config is the text config) while ``Gemma3ForConditionalGeneration`` does not apply
        its ``text_config``'s value (transformers 5).
        """
        return getattr(self.model.config, "final_logit_softcapping", None) or None

    def logits_from_hidden(self, hidden: Tensor, *, temperature: float = 1.0) -> Tensor:
        """LM-head logits ``[N, V]`` (float32, soft-capped, divided by temperature) from ``hidden [N, H]``."""
        weight, bias = self.lm_head
        logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
        cap = self.logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits / temperature

    # --- inputs ----------------------------------------------------------------------------------

    def _prepare(self, model_inputs: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(model_inputs, Mapping):
            raise RolloutError(f"HFPolicy: model_inputs must be a mapping (the model's keyword arguments), got "
                               f"{type(model_inputs).__name__}.")
        inputs = dict(model_inputs)
        if "input_ids" not in inputs:
            raise RolloutError("HFPolicy: model_inputs must contain 'input_ids' [B, P+T] (the response in the last T columns).")
        self._check_token_ids(inputs["input_ids"])
        if self.adapter is not None and hasattr(self.adapter, "prepare_inputs"):
            inputs = self.adapter.prepare_inputs(inputs, self.model)
        return inputs

    def _check_token_ids(self, ids: Any) -> None:
        """``input_ids`` is a dense integer tensor of ids the model's embedding and LM head both cover."""
        if not isinstance(ids, Tensor) or storage_problem(ids) is not None or not _is_integer(ids):
            got = (f"a {ids.layout} {ids.dtype} tensor on {ids.device}" if isinstance(ids, Tensor)
                   else type(ids).__name__)
            raise RolloutError(f"HFPolicy: input_ids must be a dense integer (int64) tensor of token ids, got {got}; "
                               f"convert with `.long()`.")
        vocab = self.model.get_output_embeddings().weight.shape[0]
        embed = getattr(self.model, "get_input_embeddings", lambda: None)()
        if embed is not None and getattr(embed, "weight", None) is not None:
            vocab = min(vocab, embed.weight.shape[0])
        # Out-of-range ids would fail inside the embedding (an IndexError on the CPU, a device-side
        # assert on CUDA) or read another token's logit: say so before the forward.
        ensure(((ids >= 0) & (ids < vocab)).all(), lambda: (
            f"HFPolicy: input_ids hold token ids outside the model's vocabulary [0, {vocab}) (min {int(ids.min())}, "
            f"max {int(ids.max())}); tokenize with the model's own tokenizer and fill padding with its pad id."))

    def slice_rows(self, inputs: Mapping[str, Any], rows: slice) -> dict[str, Any]:
        """The model inputs of rows ``rows`` (multimodal layouts are sliced by the adapter)."""
        if self.adapter is not None:
            return self.adapter.slice_rows(inputs, rows)
        B = inputs["input_ids"].shape[0]
        out = {}
        for key, value in inputs.items():
            if isinstance(value, Tensor) and value.ndim > 0:
                if value.shape[0] != B:
                    raise AdapterError(
                        f"HFPolicy: model_inputs[{key!r}] has leading dim {value.shape[0]}, not B = {B}, so it cannot "
                        f"be split by rows; multimodal models need an adapter (pip install 'rlcredit[mm]')."
                    )
                out[key] = value[rows]
            else:
                out[key] = value
        return out

    def _last_hidden(self, inputs: dict[str, Any]) -> Tensor:
        backbone = getattr(self.model, "model", None)
        if backbone is not None:
            return backbone(**inputs, use_cache=False).last_hidden_state
        out = self.model(**inputs, use_cache=False, output_hidden_states=True)
        return out.hidden_states[-1]

    # --- the main entry point --------------------------------------------------------------------

    def response_stats(
        self,
        model_inputs: Mapping[str, Any],
        response_mask: Tensor,
        *,
        temperature: float = 1.0,
        logprobs: bool = True,
        entropy: bool = False,
        hidden: bool = False,
        grad: bool = False,
        transform: InputTransform | None = None,
    ) -> TokenStats:
        """Per-response-token log-probs, entropy and/or last hidden states, chunked over rows.

        Args:
            model_inputs: the model's inputs, ``input_ids [B, P+T]`` and whatever else it takes.
            response_mask: ``[B, T]`` bool.
            temperature: divide the logits by it (use the sampling temperature).
            logprobs, entropy, hidden: which quantities to return.
            grad: keep the graph (for the loss); otherwise everything runs under ``no_grad``.
            transform: ``(chunk_inputs, rows) -> chunk_inputs`` applied to each row chunk before its
                forward (how ``rlcredit_mm`` perturbs one chunk of pixels at a time).

        Returns:
            ``TokenStats`` with ``[B, T]`` tensors, 0 on padding.
        """
        if not isinstance(response_mask, Tensor) or response_mask.dtype != torch.bool or response_mask.ndim != 2:
            raise RolloutError(f"HFPolicy: response_mask must be a [B, T] bool tensor, got {response_mask!r:.80}.")
        check_real("HFPolicy.response_stats", "temperature", temperature, low=0.0, low_open=True)
        inputs = self._prepare(model_inputs)
        ids = inputs["input_ids"]
        B, T = response_mask.shape
        if ids.ndim != 2 or ids.shape[0] != B or ids.shape[1] <= T:
            raise RolloutError(
                f"HFPolicy: input_ids must be [B, P+T] with B = {B} and at least one prompt token before the "
                f"T = {T} response columns, got {list(ids.shape)}."
            )
        device = self.device
        mask = response_mask.to(device)
        hid_out = None
        chunks_lp, chunks_ent = [], []
        with torch.set_grad_enabled(grad):
            for start in range(0, B, self.rows_per_chunk):
                rows = slice(start, min(B, start + self.rows_per_chunk))
                chunk = self.slice_rows(inputs, rows)
                if transform is not None:
                    chunk = transform(chunk, rows)
                chunk = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in chunk.items()}
                # The hidden state at column j predicts token j+1: response token t is predicted at P+t-1.
                h = self._last_hidden(chunk)[:, -T - 1:-1]
                if hidden:
                    if hid_out is None:
                        hid_out = torch.zeros(B, T, h.shape[-1], dtype=h.dtype, device=device)
                    hid_out[rows] = torch.where(mask[rows, :, None], h.detach() if not grad else h, 0)
                if not (logprobs or entropy):
                    continue
                m = mask[rows]
                flat_h = h[m]  # [n, H]: valid positions only
                tokens = chunk["input_ids"][:, -T:][m]
                lp_parts, ent_parts = [], []
                for s in range(0, flat_h.shape[0], self.tokens_per_chunk):
                    z = self.logits_from_hidden(flat_h[s:s + self.tokens_per_chunk], temperature=temperature)
                    # The vocabulary kernels keep only z for the backward (no float32 softmax copies)
                    # and run fused on CUDA.
                    if logprobs:
                        lp_parts.append(selected_logprobs(z, tokens[s:s + self.tokens_per_chunk]))
                    if entropy:
                        ent_parts.append(token_entropy(z))
                if logprobs:
                    chunks_lp.append((rows, m, torch.cat(lp_parts) if lp_parts else flat_h.new_zeros(0, dtype=torch.float32)))
                if entropy:
                    chunks_ent.append((rows, m, torch.cat(ent_parts) if ent_parts else flat_h.new_zeros(0, dtype=torch.float32)))
            # Scatter the flat values back into [B, T] without in-place writes on grad tensors.
            lp_out = _assemble(chunks_lp, B, T, device) if logprobs else None
            ent_out = _assemble(chunks_ent, B, T, device) if entropy else None
        return TokenStats(logprobs=lp_out, entropy=ent_out, hidden=hid_out)

    def logprobs(self, model_inputs: Mapping[str, Any], response_mask: Tensor, *, temperature: float = 1.0) -> Tensor:
        """Differentiable ``[B, T]`` log-probs of the response tokens (for ``Strategy.loss``)."""
        return self.response_stats(model_inputs, response_mask, temperature=temperature, grad=True).logprobs


def _is_integer(x: Tensor) -> bool:
    return not (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool)


def _assemble(parts: list[tuple[slice, Tensor, Tensor]], B: int, T: int, device: torch.device) -> Tensor:
    """``[B, T]`` float32 from per-chunk flat values at the chunk's valid positions (0 elsewhere)."""
    rows_out = []
    for rows, m, flat in parts:
        block = torch.zeros(m.shape, dtype=torch.float32, device=device)
        rows_out.append(block.masked_scatter(m, flat.float()))
    return torch.cat(rows_out, dim=0) if rows_out else torch.zeros(B, T, device=device)
