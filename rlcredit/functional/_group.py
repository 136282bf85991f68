"""Trajectory-level baselines over groups of rollouts of one prompt, and reward shaping."""

from __future__ import annotations

import torch

from rlcredit.functional._checks import (
    check_device,
    check_int,
    check_positive_int,
    check_real,
    check_shape,
)
from rlcredit.errors import RLCreditError, RolloutError
from rlcredit.functional._finite import pow2_scale
from rlcredit.functional._reduce import GroupIndex, Reducer, all_max, all_min, all_sum

__all__ = ["group_normalize", "group_center", "leave_one_out", "overlong_penalty", "batch_normalize"]


def _rewards_and_ids(
    fn: str, rewards: object, group_ids: object
) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = check_shape(fn, "rewards", rewards, "B", [None])
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise RolloutError(
            f"{fn}: `rewards` must be a real (float or int) tensor, got dtype {rewards.dtype}; "
            f"convert it with `.float()`."
        )
    group_ids = check_shape(fn, "group_ids", group_ids, "B", [rewards.shape[0]])
    check_int(fn, "group_ids", group_ids)
    check_device(fn, [("rewards", rewards), ("group_ids", group_ids)])
    return rewards.float(), group_ids.long()


def _group_moments(
    r: torch.Tensor, group_ids: torch.Tensor, reducer: Reducer | None
) -> tuple[GroupIndex, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index, count, scaled mean, scaled sum of squared deviations, all-equal flag, scale) per group buffer.

    The moments are those of ``r / scale``, ``scale`` a power of two per group within a factor 2 of
    its largest ``|r|`` (``pow2_scale``): the division is exact and commutes with rounding, so
    ``mean * scale`` and ``sq_dev * scale**2`` are the moments of ``r`` to the last bit, while
    neither the sum nor the squares can overflow for any finite float32 rewards (``(r - mean)**2``
    does beyond ``|r| ~ 1.8e19``, which used to turn every advantage of such a group into 0).
    """
    index = GroupIndex(group_ids, reducer)
    r_all = index.gather(r)
    count = index.reduce(torch.ones_like(r_all), "sum")
    scale = pow2_scale(index.reduce(r_all.abs(), "amax"))
    r_s = r_all / scale[index.seg]
    mean = index.reduce(r_s, "sum") / count.clamp_min(1.0)
    # Two-pass variance: sum((r - mean)^2) rather than E[r^2] - mean^2, which cancels badly
    # for rewards with a large offset (e.g. a length bonus of ~1e3 on 0/1 correctness).
    sq_dev = index.reduce((r_s - mean[index.seg]).square(), "sum")
    # A group is constant iff its max equals its min: an exact test, whereas r - mean can be a
    # few ulps off zero (0.1 * 3 / 3 != 0.1 in float32) and would then be divided by ~eps.
    constant = index.reduce(r_all, "amax") == index.reduce(r_all, "amin")
    return index, count, mean, sq_dev, constant, scale


def group_normalize(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    eps: float = 1e-6,
    unbiased: bool = True,
    reducer: Reducer | None = None,
) -> torch.Tensor:
    """GRPO's group-normalised advantage: each reward standardised within its prompt's group.

    Shao et al. 2024, *DeepSeekMath* (arXiv 2402.03300), outcome supervision:

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)

    with ``std`` unbiased (``n - 1``) by default, as verl and TRL compute it. ``eps`` is 1e-6 in
    verl and 1e-4 in TRL. Degenerate groups are defined, not NaN: a group whose rewards are all
    equal gives exactly 0 (tested with ``max == min``, not by float cancellation), and so does a
    one-sample group (verl instead returns ``r_i`` for it; there is no baseline to subtract, so
    we give it no signal). Rewards must be finite; any finite float32 magnitude works (the moments
    are taken of the rewards divided by a power of two near each group's largest, which is exact:
    rewards of ``1e30`` normalise like rewards of ``1``).

    With a ``reducer`` the rewards and ids of every rank are gathered first, so a group whose
    rollouts are spread over ranks (TRL spreads a prompt's completions over processes) is
    normalised as a whole; each rank returns its own rows.

    Args:
        rewards: ``[B]`` float (or int) rewards, any dtype; maths in float32.
        group_ids: ``[B]`` integer id of each row's group (prompt). Any values, in any order:
            groups need not be contiguous or sorted.
        eps: ``>= 0`` added to the standard deviation.
        unbiased: divide the variance by ``n - 1`` (True) or ``n``.
        reducer: cross-rank reducer, or None when this process holds the whole batch.

    Returns:
        ``[B]`` float32 advantages.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import group_normalize
        >>> rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0])
        >>> group_ids = torch.tensor([7, 7, 3, 3, 9])
        >>> group_normalize(rewards, group_ids)  # std of {1, 0} is 0.7071; {0.5, 0.5} and {2} give 0
        tensor([ 0.7071, -0.7071,  0.0000,  0.0000,  0.0000])
    """
    fn = "group_normalize"
    r, ids = _rewards_and_ids(fn, rewards, group_ids)
    check_real(fn, "eps", eps, low=0.0)
    index, count, mean, sq_dev, constant, scale = _group_moments(r, ids, reducer)
    dof = count - 1.0 if unbiased else count
    std = (sq_dev / dof.clamp_min(1.0)).sqrt()
    loc = index.local
    # (r - mean) / (std + eps) with every term divided by the group's scale: the same quotient.
    denom = std[loc] + eps / scale[loc]
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = (r / scale[loc] - mean[loc]) / safe
    # count == 1 implies constant; denom == 0 only with eps == 0 and an underflowed variance.
    return torch.where(constant[loc] | (denom == 0), torch.zeros_like(out), out)


def group_center(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, reducer: Reducer | None = None
) -> torch.Tensor:
    """Dr. GRPO's advantage: the reward minus its group mean, no division by the std.

    Liu et al. 2025, *Understanding R1-Zero-Like Training: A Critical Perspective*
    (arXiv 2503.20783): dividing by ``std_g`` up-weights prompts that are too easy or too hard,
    so Dr. GRPO only centres:

        A_i = r_i - mean_g(r)

    One-sample groups and all-equal groups give exactly 0. With a ``reducer`` groups are
    gathered across ranks as in ``group_normalize``.

    Args:
        rewards: ``[B]`` float (or int) rewards; maths in float32.
        group_ids: ``[B]`` integer group id of each row (any values, any order).
        reducer: cross-rank reducer, or None when this process holds the whole batch.

    Returns:
        ``[B]`` float32 advantages.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import group_center
        >>> group_center(torch.tensor([1.0, 0.0, 0.0, 3.0]), torch.tensor([0, 0, 0, 5]))
        tensor([ 0.6667, -0.3333, -0.3333,  0.0000])
    """
    r, ids = _rewards_and_ids("group_center", rewards, group_ids)
    index, _, mean, _, constant, scale = _group_moments(r, ids, reducer)
    out = r - mean[index.local] * scale[index.local]
    return torch.where(constant[index.local], torch.zeros_like(out), out)


def leave_one_out(
    rewards: torch.Tensor, group_ids: torch.Tensor, *, reducer: Reducer | None = None
) -> torch.Tensor:
    """RLOO's advantage: the reward minus the mean reward of the *other* members of its group.

    Ahmadian et al. 2024, *Back to Basics: Revisiting REINFORCE Style Optimization for Learning
    from Human Feedback in LLMs* (arXiv 2402.14740):

        A_i = r_i - (sum_g(r) - r_i) / (n_g - 1) = n_g / (n_g - 1) * (r_i - mean_g(r))

    computed in the second form, which does not cancel ``sum_g - r_i``. A one-sample group has no
    other member: 0. All-equal groups give exactly 0. With a ``reducer`` groups are gathered
    across ranks as in ``group_normalize``.

    Args:
        rewards: ``[B]`` float (or int) rewards; maths in float32.
        group_ids: ``[B]`` integer group id of each row (any values, any order).
        reducer: cross-rank reducer, or None when this process holds the whole batch.

    Returns:
        ``[B]`` float32 advantages.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import leave_one_out
        >>> leave_one_out(torch.tensor([1.0, 0.0, 0.0, 3.0]), torch.tensor([0, 0, 0, 5]))
        tensor([ 1.0000, -0.5000, -0.5000,  0.0000])
    """
    r, ids = _rewards_and_ids("leave_one_out", rewards, group_ids)
    index, count, mean, _, constant, scale = _group_moments(r, ids, reducer)
    loc = index.local
    n = count[loc]
    out = n / (n - 1.0).clamp_min(1.0) * (r - mean[loc] * scale[loc])
    return torch.where(constant[loc], torch.zeros_like(out), out)


def overlong_penalty(
    lengths: torch.Tensor, *, max_length: int, cache_length: int
) -> torch.Tensor:
    """DAPO's soft overlong punishment: a length-dependent reward added to the task reward.

    Yu et al. 2025, *DAPO: An Open-Source LLM Reinforcement Learning System at Scale*
    (arXiv 2503.14476), Eq. 13, with ``L_max = max_length`` and ``L_cache = cache_length``:

        R(y) = 0                                   if |y| <= L_max - L_cache
        R(y) = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
        R(y) = -1                                  if |y| > L_max

    i.e. ``clamp(((L_max - L_cache) - |y|) / L_cache, -1, 0)``. The paper uses L_max = 20480,
    L_cache = 4096.

    Args:
        lengths: ``[B]`` integer response lengths ``|y|`` (e.g. ``response_mask.sum(-1)``).
        max_length: ``L_max``, an int >= 1.
        cache_length: ``L_cache``, an int with ``1 <= cache_length <= max_length``.

    Returns:
        ``[B]`` float32 penalties in ``[-1, 0]``.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import overlong_penalty
        >>> overlong_penalty(torch.tensor([5, 6, 8, 10, 12]), max_length=10, cache_length=4)
        tensor([ 0.0000,  0.0000, -0.5000, -1.0000, -1.0000])
    """
    fn = "overlong_penalty"
    lengths = check_shape(fn, "lengths", lengths, "B", [None])
    check_int(fn, "lengths", lengths)
    check_positive_int(fn, "max_length", max_length)
    check_positive_int(fn, "cache_length", cache_length)
    if cache_length > max_length:
        raise RLCreditError(
            f"{fn}: `cache_length` ({cache_length}) must be <= `max_length` ({max_length}): the "
            f"soft punishment zone is the last `cache_length` tokens before `max_length`."
        )
    excess = (max_length - cache_length) - lengths.long()
    return (excess.double() / cache_length).clamp(-1.0, 0.0).float()


def batch_normalize(
    rewards: torch.Tensor,
    *,
    center: bool = True,
    eps: float = 1e-6,
    unbiased: bool = True,
    reducer: Reducer | None = None,
) -> torch.Tensor:
    """Rewards (or advantages) standardised over the whole batch, across ranks.

    PPO-style batch whitening; TRL's ``scale_rewards="batch"`` (after Hu et al. 2025, *Tricks or
    Traps? A Deep Dive into RL for LLM Reasoning*, arXiv 2508.08221, "group mean, batch std") and
    RLOO's ``normalize_advantages``. With ``mean_b`` and ``std_b`` over every row of the batch::

        A_i = (r_i - mean_b(r)) / (std_b(r) + eps)      center=True
        A_i = r_i / (std_b(r) + eps)                    center=False

    ``std`` is unbiased (``n - 1``) by default, as TRL's ``nanstd``. ``center=False`` followed by
    ``group_center`` is TRL's batch scaling, ``(r_i - mean_g r) / (std_b r + eps)`` with
    ``eps = 1e-4``. Degenerate cases are defined: with ``center=True`` an all-equal batch gives
    exactly 0 (tested with ``max == min``); a batch with ``std_b + eps == 0`` (all equal and
    ``eps = 0``) is not divided; a one-row batch has ``std_b = 0``. With a ``reducer`` the
    statistics span every rank's rows (two-pass variance: one all-reduce of the count and sum,
    one of the squared deviations, one max and one min), and each rank returns its own rows.

    Args:
        rewards: ``[B]`` float (or int) rewards or advantages; maths in float32.
        center: subtract the batch mean (True) or only divide by the batch std (False).
        eps: ``>= 0`` added to the standard deviation.
        unbiased: divide the variance by ``n - 1`` (True) or ``n``.
        reducer: cross-rank reducer, or None when this process holds the whole batch.

    Returns:
        ``[B]`` float32.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import batch_normalize
        >>> batch_normalize(torch.tensor([1.0, 0.0, 0.5, 0.5]))  # mean 0.5, std 0.4082
        tensor([ 1.2247, -1.2247,  0.0000,  0.0000])
        >>> batch_normalize(torch.tensor([1.0, 0.0, 0.5, 0.5]), center=False)
        tensor([2.4495, 0.0000, 1.2247, 1.2247])
    """
    fn = "batch_normalize"
    rewards = check_shape(fn, "rewards", rewards, "B", [None])
    if rewards.dtype == torch.bool or rewards.is_complex():
        raise RolloutError(
            f"{fn}: `rewards` must be a real (float or int) tensor, got dtype {rewards.dtype}; "
            f"convert it with `.float()`."
        )
    check_real(fn, "eps", eps, low=0.0)
    r = rewards.float()
    # The moments of r / scale, scale a power of two near the batch's largest |r| (see
    # _group_moments): exact, and neither the sum nor the squares can overflow.
    scale_r = pow2_scale(all_max(r.abs().max() if r.numel() else r.new_zeros(()), reducer))
    r_s = r / scale_r
    count_sum = all_sum(torch.stack([torch.full((), float(r.numel()), device=r.device), r_s.sum()]), reducer)
    count, mean_s = count_sum[0], count_sum[1] / count_sum[0].clamp_min(1.0)
    # Two-pass variance: the squared deviations from the global mean (no E[r^2] - mean^2 cancellation).
    sq_dev = all_sum((r_s - mean_s).square().sum(), reducer)
    dof = count - 1.0 if unbiased else count
    # Everything in the scaled domain: the result is the same to the last bit, and std itself
    # (which can exceed float32's range while r / std cannot) is never formed.
    std_s = (sq_dev / dof.clamp_min(1.0)).sqrt()
    denom = std_s + eps / scale_r
    denom = torch.where(denom > 0, denom, torch.ones_like(denom) / scale_r)
    if not center:
        return r_s / denom
    # An empty shard has no max/min: it contributes the identity of each reduction.
    hi = all_max(r.max() if r.numel() else r.new_tensor(float("-inf")), reducer)
    lo = all_min(r.min() if r.numel() else r.new_tensor(float("inf")), reducer)
    out = (r_s - mean_s) / denom
    return torch.where(hi == lo, torch.zeros_like(out), out)
