"""Bad inputs raise an RLCreditError whose message names the argument and the problem."""

from __future__ import annotations

import pytest
import torch

import rlcredit.functional as F
from rlcredit.errors import RLCreditError, RolloutError

M = torch.ones(2, 3, dtype=torch.bool)
X = torch.zeros(2, 3)
R = torch.zeros(4)
G = torch.zeros(4, dtype=torch.long)
L = torch.zeros(2, 3, 5)

# name -> (call, error class, fragments the message must contain)
CATALOGUE = {
    "rewards_2d": (lambda: F.group_normalize(R[:, None], G), RolloutError, ["rewards", "[B]", "[4, 1]"]),
    "group_ids_float": (lambda: F.group_normalize(R, G.float()), RolloutError, ["group_ids", "int64", "float32"]),
    "group_ids_length": (lambda: F.group_center(R, G[:3]), RolloutError, ["group_ids", "B=4", "[3]"]),
    "rewards_bool": (lambda: F.leave_one_out(R.bool(), G), RolloutError, ["rewards", "bool"]),
    "rewards_not_tensor": (lambda: F.group_normalize([1.0, 2.0], G[:2]), RolloutError, ["rewards", "torch.Tensor", "list"]),
    "eps_negative": (lambda: F.group_normalize(R, G, eps=-1.0), RLCreditError, ["eps", "[0.0, inf)"]),
    "old_logprobs_shape": (lambda: F.clipped_surrogate(X, X[:, :2], R[:2]), RolloutError, ["old_logprobs", "[2, 3]", "[2, 2]"]),
    "advantages_shape": (lambda: F.clipped_surrogate(X, X, R), RolloutError, ["advantages", "[B=2]", "[4]"]),
    "logprobs_int": (lambda: F.clipped_surrogate(X.long(), X, R[:2]), RolloutError, ["logprobs", "floating", "int64"]),
    "logprobs_1d": (lambda: F.clipped_surrogate(R, R, R), RolloutError, ["logprobs", "[B, T]", "[4]"]),
    "clip_low_range": (lambda: F.clipped_surrogate(X, X, R[:2], clip_low=1.5), RLCreditError, ["clip_low", "[0.0, 1.0)", "1.5"]),
    "clip_high_negative": (lambda: F.clipped_surrogate(X, X, R[:2], clip_high=-0.1), RLCreditError, ["clip_high"]),
    "dual_clip_below_one": (lambda: F.clipped_surrogate(X, X, R[:2], dual_clip=0.5), RLCreditError, ["dual_clip", "(1.0, inf)"]),
    "surrogate_mask_dtype": (lambda: F.clipped_surrogate(X, X, R[:2], mask=X), RolloutError, ["mask", "bool"]),
    "aggregate_mode": (lambda: F.aggregate(X, M, mode="mean"), RLCreditError, ["'mean'", "token_mean", "seq_mean_token_sum_norm"]),
    "aggregate_mask_int": (lambda: F.aggregate(X, M.long()), RolloutError, ["mask", "bool", "int64"]),
    "aggregate_weights_shape": (lambda: F.aggregate(X, M, X[:1]), RolloutError, ["weights", "[2, 3]", "[1, 3]"]),
    "aggregate_renormalize_token_sum": (lambda: F.aggregate(X, M, mode="seq_mean_token_sum", renormalize=True), RLCreditError, ["renormalize", "seq_mean_token_sum"]),
    "aggregate_max_length_zero": (lambda: F.aggregate(X, M, mode="seq_mean_token_sum_norm", max_length=0), RLCreditError, ["max_length", ">= 1"]),
    "aggregate_max_length_wrong_mode": (lambda: F.aggregate(X, M, max_length=10), RLCreditError, ["max_length", "seq_mean_token_sum_norm"]),
    "coefficients_mode": (lambda: F.loss_coefficients(M, mode="sum"), RLCreditError, ["loss_coefficients", "'sum'", "token_mean"]),
    "coefficients_mask_1d": (lambda: F.loss_coefficients(M[0]), RolloutError, ["loss_coefficients", "mask", "[B, T]"]),
    "coefficients_weights_int": (lambda: F.loss_coefficients(M, M.long()), RolloutError, ["weights", "floating"]),
    "k3_shape": (lambda: F.k3_kl(X, X.T), RolloutError, ["ref_logprobs", "[2, 3]", "[3, 2]"]),
    "masked_mean_mask": (lambda: F.masked_mean(X, M[:, :2]), RolloutError, ["mask", "[2, 3]"]),
    "fraction_zero": (lambda: F.top_fraction_mask(X, M, 0.0), RLCreditError, ["fraction", "(0.0, 1.0]", "0.0"]),
    "fraction_above_one": (lambda: F.top_fraction_mask(X, M, 1.5), RLCreditError, ["fraction", "1.5"]),
    "fraction_nan": (lambda: F.top_fraction_mask(X, M, float("nan")), RLCreditError, ["fraction", "nan"]),
    "fraction_bool": (lambda: F.top_fraction_mask(X, M, True), RLCreditError, ["fraction", "True"]),
    "unknown_scope": (lambda: F.top_fraction_mask(X, M, 0.5, "row"), RLCreditError, ["scope", "'row'", "'sequence'", "'batch'"]),
    "group_scope_without_ids": (lambda: F.top_fraction_mask(X, M, 0.5, "group"), RLCreditError, ["group_ids", "'group'"]),
    "top_fraction_mask_dtype": (lambda: F.top_fraction_mask(X, X, 0.5), RolloutError, ["mask", "bool"]),
    "top_fraction_group_ids_shape": (lambda: F.top_fraction_mask(X, M, 0.5, "group", group_ids=G), RolloutError, ["group_ids", "B=2", "[4]"]),
    "beta_min_negative": (lambda: F.dependency_scale(R, R.bool(), beta_min=-0.1), RLCreditError, ["beta_min", "[0.0, inf)", "-0.1"]),
    "beta_min_above_one_code_form": (lambda: F.dependency_scale(R, R.bool(), beta_min=1.5), RLCreditError, ["beta_min", "[0, 1]", "1.5", "beta_max"]),
    "beta_max_not_above_min": (lambda: F.dependency_scale(R, R.bool(), beta_min=0.9, beta_max=0.9), RLCreditError, ["beta_max", "greater than beta_min (0.9)"]),
    "dependency_scope": (lambda: F.dependency_scale(R, R.bool(), scope="chunk"), RLCreditError, ["scope", "'chunk'", "'batch'", "'group'", "int"]),
    "dependency_scope_zero": (lambda: F.dependency_scale(R, R.bool(), scope=0), RLCreditError, ["scope", "0"]),
    "dependency_mean_scope": (lambda: F.dependency_scale(R, R.bool(), mean_scope="everything"), RLCreditError, ["mean_scope"]),
    "mean_scope_with_bounded_form": (lambda: F.dependency_scale(R, R.bool(), beta_max=1.1, mean_scope=16), RLCreditError, ["mean_scope", "beta_max"]),
    "dependency_group_without_ids": (lambda: F.dependency_scale(R, R.bool(), scope="group"), RLCreditError, ["group_ids"]),
    "dependency_valid_dtype": (lambda: F.dependency_scale(R, R), RolloutError, ["valid", "bool"]),
    "dependency_valid_shape": (lambda: F.dependency_scale(R, M), RolloutError, ["valid", "[B=4]", "[2, 3]"]),
    "overlong_cache_too_long": (lambda: F.overlong_penalty(G, max_length=4, cache_length=8), RLCreditError, ["cache_length", "max_length"]),
    "overlong_lengths_float": (lambda: F.overlong_penalty(R, max_length=4, cache_length=2), RolloutError, ["lengths", "int"]),
    "entropy_temperature": (lambda: F.token_entropy(L, temperature=0.0), RLCreditError, ["temperature", "(0.0, inf)"]),
    "entropy_chunk": (lambda: F.token_entropy(L, chunk_size=0), RLCreditError, ["chunk_size", ">= 1"]),
    "entropy_int_logits": (lambda: F.token_entropy(L.long()), RolloutError, ["logits", "floating"]),
    "entropy_0d": (lambda: F.token_entropy(torch.tensor(1.0)), RolloutError, ["logits", "[..., V]"]),
    "selected_tokens_float": (lambda: F.selected_logprobs(L, X), RolloutError, ["tokens", "int"]),
    "selected_tokens_shape": (lambda: F.selected_logprobs(L, X.long().T), RolloutError, ["tokens", "[2, 3]", "[3, 2]"]),
    "token_kl_shapes": (lambda: F.token_kl(L, L[..., :4]), RolloutError, ["logits_q", "[2, 3, 5]", "[2, 3, 4]"]),
    "token_kl_mask_shape": (lambda: F.token_kl(L, L, M[:, :2]), RolloutError, ["mask", "[2, 3]", "[2, 2]"]),
    "fused_weight_hidden": (lambda: F.fused_token_kl(L, L, torch.zeros(7, 4)), RolloutError, ["weight", "H=5", "[7, 4]"]),
    "fused_bias_shape": (lambda: F.fused_token_kl(L, L, torch.zeros(7, 5), bias=torch.zeros(6)), RolloutError, ["bias", "V=7", "[6]"]),
    "fused_hidden_shapes": (lambda: F.fused_token_kl(L, L[:1], torch.zeros(7, 5)), RolloutError, ["hidden_q", "[2, 3, 5]"]),
    "device_mismatch": (lambda: F.aggregate(X, M.to("meta")), RolloutError, ["mask", "meta", "cpu", ".to("]),
}


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_input_raises_a_clear_error(case):
    call, error, fragments = CATALOGUE[case]
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, RLCreditError) and isinstance(info.value, ValueError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
