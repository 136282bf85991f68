"""A plain-torch transcription of the released VPPO code (huaixuheqing/VPPO-RL @ a23c54b).

Each function reproduces the released lines it cites, statement by statement, with the
configuration of the released 7B script (``examples/configs/train_vppo_7b.sh``:
``use_vppo_on_perception``, ``use_advantage_shaping``, ``use_entropy_penalty``, no KL loss,
``loss_type=default``, ``loss_avg_mode=token``) on one device (``world_size = 1``,
``dist.all_reduce`` the identity). What is not transcribed: the model forward of
``_forward_micro_batch`` (the current log-probs are given), logging, the optimizer step, and
``torch.sort``'s unstable order (``stable=True`` here: the released order of tied scores is not
reproducible, see docs/methods/vppo.md). Nothing here imports rlcredit.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch


def masked_mean(values, mask, dim=None, eps=1e-8):
    """``verl/utils/torch_functional.py`` L72-74."""
    return (values * mask).sum(dim=dim) / (mask.sum(dim=dim) + eps)


def average_loss(values, mask, mode="token", eps=1e-8):
    """``verl/trainer/core_algos.py`` L382-406 (``mode="token"``)."""
    assert mode == "token"
    return masked_mean(values, mask, eps=eps)


def compute_grpo_outcome_advantage(token_level_rewards, response_mask, index, eps=1e-6):
    """``verl/trainer/core_algos.py`` L176-216."""
    scores = token_level_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean, id2std = {}, {}
    bsz = scores.shape[0]
    for i in range(bsz):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        assert len(id2score[idx]) > 1, "GRPO needs rollout.n > 1."
        id2mean[idx] = torch.mean(torch.tensor(id2score[idx]))
        id2std[idx] = torch.std(torch.tensor(id2score[idx]))
    for i in range(bsz):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
    returns = scores.unsqueeze(-1) * response_mask
    return returns, returns


def compute_policy_loss(old_log_probs, log_probs, advantages, response_mask, clip_ratio_low, clip_ratio_high,
                        clip_ratio_dual, loss_token_mask=None):
    """``verl/trainer/core_algos.py`` L409-501 (``loss_type="default"``, ``loss_avg_mode="token"``), no metrics."""
    negative_approx_kl = log_probs - old_log_probs
    log_importance_ratio = negative_approx_kl
    ratio = torch.exp(torch.clamp(log_importance_ratio, -20.0, 20.0))
    clipped_ratio = torch.exp(
        torch.clamp(log_importance_ratio, np.log(1.0 - clip_ratio_low), np.log(1.0 + clip_ratio_high))
    )
    pg_loss = -advantages * ratio
    pg_loss2 = -advantages * clipped_ratio
    pg_loss3 = -advantages * clip_ratio_dual
    clipped_pg_loss_higher = torch.max(pg_loss, pg_loss2)
    clipped_pg_loss_lower = torch.min(clipped_pg_loss_higher, pg_loss3)
    final_pg_loss = torch.where(advantages < 0, clipped_pg_loss_lower, clipped_pg_loss_higher)
    if loss_token_mask is not None:
        final_pg_loss = final_pg_loss * loss_token_mask.detach()
    return average_loss(final_pg_loss, response_mask, mode="token")


def perception_top_p_mask(aug_log_probs, old_log_probs, response_mask, top_p, *, stable=True):
    """``dp_actor.py`` L398-431 (``use_vppo_on_perception``): ``(low_var_kl, top_p_mask)``, ``[B, T]`` each.

    ``stable=True`` breaks ties by position (the released ``torch.sort`` is unstable, so its tie
    order is not reproducible); ``stable=False`` is the released call.
    """
    log_probs_diff = (aug_log_probs - old_log_probs).clamp(-20.0, 20.0)
    low_var_kl = (log_probs_diff.exp() - log_probs_diff - 1).contiguous()
    low_var_kl = torch.clamp(low_var_kl, min=0.0, max=10.0)
    low_var_kl_for_sort = low_var_kl.clone()
    invalid_mask = ~response_mask.bool()
    low_var_kl_for_sort[invalid_mask] = -torch.inf
    num_valid_tokens = response_mask.sum(dim=1)
    k = torch.ceil(num_valid_tokens * top_p).int()
    sorted_vals, sorted_indices = torch.sort(low_var_kl_for_sort, dim=1, descending=True, stable=stable)
    range_tensor = torch.arange(low_var_kl_for_sort.size(1), device=low_var_kl_for_sort.device).expand_as(
        low_var_kl_for_sort)
    rank_mask = range_tensor < k.unsqueeze(1)
    top_p_mask = torch.zeros_like(low_var_kl_for_sort, dtype=torch.bool)
    top_p_mask.scatter_(1, sorted_indices, rank_mask)
    return low_var_kl, top_p_mask & response_mask.bool()


def update_policy(old_log_probs, aug_log_probs, advantages, response_mask, log_probs, *, mini_batch_size=128,
                  micro_batch_size=16, top_p=0.4, advantage_scaling_min=0.9, clip_ratio_low=0.2,
                  clip_ratio_high=0.28, clip_ratio_dual=3.0, entropy_penalty_coef=0.06):
    """``verl/workers/actor/dp_actor.py`` ``update_policy`` L242-580, one epoch on one device.

    Args:
        old_log_probs, aug_log_probs: ``[B, T]`` float32 (``old_log_probs``, ``aug_log_probs``).
        advantages: ``[B, T]`` float32 token advantages (``compute_grpo_outcome_advantage``).
        response_mask: ``[B, T]`` int64 (verl's ``get_response_mask`` dtype).
        log_probs: ``[B, T]`` float32 leaf with ``requires_grad``: what ``_forward_micro_batch``
            returns for the rows of each micro-batch; its ``.grad`` accumulates as the model's would.

    Returns:
        ``low_var_kl [B, T]``, ``top_p_mask [B, T]``, ``scaling_factor [B]``, the shaped
        ``advantages [B, T]`` and ``losses`` (one per mini-batch: the sum of its micro-batches'
        backpropagated losses).
    """
    B = response_mask.shape[0]
    out = {"low_var_kl": [], "top_p_mask": [], "scaling_factor": [], "advantages": [], "losses": []}
    for m0 in range(0, B, mini_batch_size):  # L255: data.split(global_batch_size_per_device)
        mb = slice(m0, min(B, m0 + mini_batch_size))
        mini_loss = torch.zeros(())
        total_response_tokens = torch.sum(response_mask[mb])  # L263-264 (all_reduce: one device)
        global_min_score, global_max_score = None, None  # L267
        with torch.no_grad():  # L271-300
            mb_old_log_probs = old_log_probs[mb]
            mb_aug_log_probs = aug_log_probs[mb]
            mb_response_mask = response_mask[mb]
            mb_log_probs_diff = (mb_aug_log_probs - mb_old_log_probs).clamp(-20.0, 20.0)
            mb_low_var_kl = (mb_log_probs_diff.exp() - mb_log_probs_diff - 1).contiguous()
            mb_low_var_kl = torch.clamp(mb_low_var_kl, min=0.0, max=10.0)
            mb_num_valid_tokens = mb_response_mask.sum(dim=1)
            mb_num_valid_tokens_safe = torch.clamp(mb_num_valid_tokens, min=1)
            mb_masked_low_var_kl = mb_low_var_kl * mb_response_mask
            mb_sum_low_var_kl = mb_masked_low_var_kl.sum(dim=1)
            all_sensitivity_scores = mb_sum_low_var_kl / mb_num_valid_tokens_safe
            valid_scores_mask = mb_num_valid_tokens > 0
            valid_scores = all_sensitivity_scores[valid_scores_mask]
            if valid_scores.numel() > 1:
                global_min_score = torch.quantile(valid_scores, 0.0)
                global_max_score = torch.quantile(valid_scores, 1.0)
        for u0 in range(mb.start, mb.stop, micro_batch_size):  # L307: mini_batch.split(micro_batch_size)
            rows = slice(u0, min(mb.stop, u0 + micro_batch_size))
            response_mask_u = response_mask[rows]  # L314-316
            old_log_probs_u = old_log_probs[rows]
            advantages_u = advantages[rows]
            log_probs_u = log_probs[rows]  # L319-320: the forward
            loss_token_mask = None  # L323
            # L398-431: perception top-p mask
            aug_log_probs_u = aug_log_probs[rows]
            low_var_kl, top_p_mask = perception_top_p_mask(aug_log_probs_u, old_log_probs_u, response_mask_u, top_p)
            top_p_mask = top_p_mask.to(log_probs_u.dtype)
            loss_token_mask = top_p_mask
            # L483-535: advantage shaping
            with torch.no_grad():
                num_valid_tokens = response_mask_u.sum(dim=1)
                num_valid_tokens_safe = torch.clamp(num_valid_tokens, min=1)
                masked_low_var_kl = low_var_kl * response_mask_u
                sum_low_var_kl = masked_low_var_kl.sum(dim=1)
                sensitivity_score = sum_low_var_kl / num_valid_tokens_safe
                scaling_factor = torch.ones_like(sensitivity_score)
                if (global_min_score is not None and global_max_score is not None
                        and (global_max_score - global_min_score) > 1e-6):
                    valid_scores_mask_micro = num_valid_tokens > 0
                    valid_scores_micro = sensitivity_score[valid_scores_mask_micro]
                    normalized_scores = (valid_scores_micro - global_min_score) / (global_max_score - global_min_score)
                    normalized_scores = torch.clamp(normalized_scores, 0.0, 1.0)
                    target_min = advantage_scaling_min
                    mu_norm = normalized_scores.mean()
                    epsilon = 1e-8
                    target_max = target_min + (1.0 - target_min) / (mu_norm + epsilon)
                    target_range = target_max - target_min
                    mapped_scores = target_min + normalized_scores * target_range
                    scaling_factor[valid_scores_mask_micro] = mapped_scores
            advantages_u = advantages_u * scaling_factor.unsqueeze(1)
            # L537-548, L562, L564-571
            pg_loss = compute_policy_loss(old_log_probs_u, log_probs_u, advantages_u, response_mask_u,
                                          clip_ratio_low, clip_ratio_high, clip_ratio_dual, loss_token_mask)
            loss = pg_loss
            entropy_loss = -masked_mean(log_probs_u, response_mask_u)
            loss = loss + entropy_loss * entropy_penalty_coef
            loss = loss * torch.sum(response_mask_u) * 1 / total_response_tokens
            loss.backward()
            mini_loss = mini_loss + loss.detach()
            for key, value in (("low_var_kl", low_var_kl), ("top_p_mask", top_p_mask),
                               ("scaling_factor", scaling_factor), ("advantages", advantages_u.detach())):
                out[key].append(value)
        out["losses"].append(mini_loss)
    return {k: (v if k == "losses" else torch.cat(v)) for k, v in out.items()}
