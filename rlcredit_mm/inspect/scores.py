"""Per-token scores of ``rlcredit inspect`` and the demo's heatmaps: visual dependency and connectivity."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

import rlcredit

__all__ = ["SCORE_NAMES", "token_scores"]

SCORE_NAMES: tuple[str, str] = ("visual dependency", "connectivity")
"""Score names of ``token_scores``, in display order."""

def token_scores(policy: rlcredit.HFPolicy, model_inputs: Mapping[str, Any], response_mask: Tensor, *,
                 perturbation: Any = "constant") -> dict[str, Tensor]:
    """Per-token visual dependency (exact KL) and connectivity of a batch of responses.

    ``S_t = KL(pi(.|s_t, I) || pi(.|s_t, I'))`` over the full vocabulary (VPPO, arXiv 2510.09285)
    and ``c_t`` = the response token's sink-debiased attention mass on image tokens (AT-RL,
    arXiv 2602.11455), both under ``no_grad``.

    Args:
        policy: an ``rlcredit.HFPolicy`` of a supported VLM.
        model_inputs: ``input_ids [B, P+T]`` (response in the last ``T`` columns) and the model's
            image inputs.
        response_mask: ``[B, T]`` bool.
        perturbation: ``I'`` (a registered perturbation name, a spec dict or an object).

    Returns:
        ``{"visual dependency": [B, T], "connectivity": [B, T]}`` float32, 0 on padding.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit_mm.demo import model as M, task as T
        >>> kit = M.ModelKit()
        >>> model = M.build_model(kit.tokenizer, hidden=32).eval()
        >>> ex = T.make_example(0)
        >>> prompt = M.encode_prompts(kit, [ex])
        >>> resp = torch.tensor([kit.tokenizer("ok . the answer is red .")["input_ids"]])
        >>> mask = torch.ones_like(resp, dtype=torch.bool)
        >>> s = token_scores(rlcredit.HFPolicy(model), M.join_responses(prompt, resp, mask), mask)
        >>> sorted(s), s["visual dependency"].shape, bool((s["connectivity"] > 0).all())
        (['connectivity', 'visual dependency'], torch.Size([1, 7]), True)
    """
    from rlcredit_mm.connectivity import AttentionConnectivity
    from rlcredit_mm.visual_kl import VisualKL

    mask = response_mask
    B = mask.shape[0]
    rollout = rlcredit.Rollout(mask, torch.zeros(B), torch.zeros(B, dtype=torch.long), model_inputs=dict(model_inputs))
    with torch.no_grad():
        visual = VisualKL(estimate="exact", perturbation=perturbation)(rollout, policy)
        conn = AttentionConnectivity()(rollout, policy)
    conn = conn.score if isinstance(conn, rlcredit.EstimatorOutput) else conn
    zero = torch.zeros((), device=mask.device)
    return {"visual dependency": torch.where(mask, visual.float(), zero),
            "connectivity": torch.where(mask, conn.float(), zero)}
