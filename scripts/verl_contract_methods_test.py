"""Contract test of the second-wave losses against the REAL verl's own policy losses (run in .venv-verl).

    cd /work/wt-methods && PYTHONPATH=$PWD /work/main/.venv-verl/bin/python -m pytest -q scripts/verl_contract_methods_test.py

verl 0.9.1 registers ``cispo``, ``sapo``, ``geo_mean``, ``kl_cov`` and ``clip_cov`` in
``verl.trainer.ppo.core_algos``; each is called here through ``get_policy_loss_fn(name)`` with a real
``ActorConfig`` and compared with rlcredit's ``cispo``, ``sapo``, ``gmpo``, ``kl_cov`` and
``clip_cov``: loss and gradient to 1e-5 on random batches with uneven lengths (empty rows
included), token weights (verl's ``rollout_is_weights``, a per-token factor of the loss, exactly
rlcredit's token weights), every aggregation, and micro-batches (verl's ``global_batch_info`` ==
rlcredit's ``totals``).
"""

from __future__ import annotations

import pytest
import torch

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos")  # this file runs only where verl is installed

import rlcredit  # noqa: E402
from rlcredit.losses import CISPO, GMPO, SAPO, ClipCov, KLCov  # noqa: E402

MODES = {"token-mean": "token_mean", "seq-mean-token-mean": "seq_mean_token_mean",
         "seq-mean-token-sum": "seq_mean_token_sum", "seq-mean-token-sum-norm": "seq_mean_token_sum_norm"}
SEEDS = range(6)


def _batch(seed: int, B: int = 8, T: int = 9, *, row_adv: bool = False, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T  # at least one full row
    mask = torch.arange(T)[None] < lengths[:, None]
    old = torch.where(mask, -torch.rand(B, T, generator=g) * 3, 0.0)
    logp = torch.where(mask, old + spread * torch.randn(B, T, generator=g), 0.0)
    adv = torch.randn(B, generator=g)[:, None].expand(B, T) if row_adv else torch.randn(B, T, generator=g)
    adv = torch.where(mask, adv, 0.0)
    w = torch.where(mask, torch.rand(B, T, generator=g) * 2, 0.0)
    return old, logp, adv.contiguous(), mask, w


def _info(mask):
    """verl's global batch info of this batch. Given ``global_batch_size``, verl's seq-mean modes count every row,
    empty ones included, as rlcredit (and TRL) do; without it verl counts only rows with a valid token."""
    return dict(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0])


def _config(*, clip_low=0.2, clip_high=0.2, info=None, **policy_loss):
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig

    extra = {k: policy_loss.pop(k) for k in ("tau_pos", "tau_neg") if k in policy_loss}
    config = ActorConfig(strategy="fsdp", rollout_n=1, clip_ratio=clip_low, clip_ratio_low=clip_low,
                         clip_ratio_high=clip_high, ppo_micro_batch_size_per_gpu=1,
                         policy_loss=PolicyLossConfig(**policy_loss), **extra)
    config.global_batch_info.update(info or {})
    return config


def _theirs(name, config, old, logp, adv, mask, mode, w=None):
    lp = logp.clone().requires_grad_(True)
    loss, _ = verl_core.get_policy_loss_fn(name)(old, lp, adv, mask, mode, config, w)
    return loss.float(), torch.autograd.grad(loss, lp)[0]


def _ours(loss_fn, old, logp, adv, mask, w=None, totals=None, rows=None):
    r = rlcredit.Rollout(mask, torch.zeros(mask.shape[0]), torch.arange(mask.shape[0]), old_logprobs=old)
    credit = rlcredit.Credit({}, mask.float() if w is None else w, adv)
    if rows is not None:
        r, credit, logp = r.select(rows), credit.select(rows), logp[rows]
    lp = logp.clone().requires_grad_(True)
    out = loss_fn(lp, r, credit, **({} if totals is None else {"totals": totals}))
    return out.loss, torch.autograd.grad(out.loss, lp)[0], (r, credit)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _micro_batches(name, config_kw, loss_fn, mode, old, logp, adv, mask, w, *, additive=True):
    """Two micro-batches: verl's loss with global_batch_info per micro-batch == ours with the whole batch's totals.

    ``additive``: the micro-batch losses also add up to the whole batch's loss (not for KL-Cov and
    Clip-Cov, whose covariance and selection are per call: per micro-batch, in verl as in rlcredit).
    """
    B = mask.shape[0]
    _, _, (r, credit) = _ours(loss_fn, old, logp, adv, mask, w)
    totals = loss_fn.totals(r, credit)
    config = _config(info=_info(mask), **config_kw)
    whole_grad = torch.zeros_like(logp)
    total = 0.0
    for rows in (list(range(0, B, 2)), list(range(1, B, 2))):
        mine, g_mine, _ = _ours(loss_fn, old, logp, adv, mask, w, totals=totals, rows=rows)
        theirs, g_theirs = _theirs(name, config, old[rows], logp[rows], adv[rows], mask[rows], mode,
                                   None if w is None else w[rows])
        _close(mine, theirs)
        _close(g_mine, g_theirs)
        total = total + mine.detach()
        whole_grad[rows] = g_mine
    if additive:
        whole, g_whole, _ = _ours(loss_fn, old, logp, adv, mask, w)
        _close(total, whole.detach())
        _close(whole_grad, g_whole)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clips", [(0.2, 0.28), (0.2, 0.2), (None, 0.28)])
@pytest.mark.parametrize("seed", SEEDS)
def test_cispo_equals_verl(mode, clips, seed):
    old, logp, adv, mask, w = _batch(seed)
    low, high = clips
    # rlcredit's one-sided cap (clip_low=None, the paper's and TRL's form) is verl's clip_ratio_low = 1.0: bound 0.
    kw = dict(clip_low=1.0 if low is None else low, clip_high=high, loss_mode="cispo")
    loss_fn = CISPO(clip_low=low, clip_high=high, aggregation=MODES[mode])
    theirs, g_theirs = _theirs("cispo", _config(info=_info(mask), **kw), old, logp, adv, mask, mode, w)
    mine, g_mine, _ = _ours(loss_fn, old, logp, adv, mask, w)
    _close(mine, theirs)
    _close(g_mine, g_theirs)
    _micro_batches("cispo", kw, loss_fn, mode, old, logp, adv, mask, w)


@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 2.0)])
@pytest.mark.parametrize("seed", SEEDS)
def test_sapo_equals_verl(taus, seed):
    """verl's sapo forces seq-mean-token-mean whatever loss_agg_mode says (rlcredit's default)."""
    old, logp, adv, mask, w = _batch(seed)
    kw = dict(tau_pos=taus[0], tau_neg=taus[1], loss_mode="sapo")
    loss_fn = SAPO(tau_pos=taus[0], tau_neg=taus[1])
    theirs, g_theirs = _theirs("sapo", _config(info=_info(mask), **kw), old, logp, adv, mask, "token-mean", w)
    mine, g_mine, _ = _ours(loss_fn, old, logp, adv, mask, w)
    _close(mine, theirs)
    _close(g_mine, g_theirs)
    _micro_batches("sapo", kw, loss_fn, "seq-mean-token-mean", old, logp, adv, mask, w)


@pytest.mark.parametrize("clips", [(0.4, 0.4), (0.1, 0.3)])
@pytest.mark.parametrize("seed", SEEDS)
def test_gmpo_equals_verl_geo_mean(clips, seed):
    old, logp, adv, mask, _ = _batch(seed, row_adv=True)
    config = _config(clip_low=clips[0], clip_high=clips[1], loss_mode="geo_mean")
    loss_fn = GMPO(clip_low=clips[0], clip_high=clips[1])
    theirs, g_theirs = _theirs("geo_mean", config, old, logp, adv, mask, "token-mean")
    mine, g_mine, (r, credit) = _ours(loss_fn, old, logp, adv, mask)
    _close(mine, theirs)
    _close(g_mine, g_theirs)
    # Micro-batches: verl's geo_mean ignores global_batch_info (a plain mean over the micro-batch's rows);
    # rlcredit's totals divide by the whole batch's rows, i.e. verl's micro-batch loss times B_micro / B.
    B, totals = mask.shape[0], loss_fn.totals(r, credit)
    for rows in ([0, 1, 2], [3, 4, 5, 6, 7]):
        mine, g_mine, _ = _ours(loss_fn, old, logp, adv, mask, totals=totals, rows=rows)
        theirs, g_theirs = _theirs("geo_mean", config, old[rows], logp[rows], adv[rows], mask[rows], "token-mean")
        _close(mine, theirs * len(rows) / B)
        _close(g_mine, g_theirs * len(rows) / B)


@pytest.mark.parametrize("seed", SEEDS)
def test_gmpo_value_equals_verl_with_token_advantages(seed):
    """[B, T] advantages: the same loss value (verl averages them per row first; the gradient shares differ)."""
    old, logp, adv, mask, _ = _batch(seed)
    config = _config(clip_low=0.4, clip_high=0.4, loss_mode="geo_mean")
    theirs, _ = _theirs("geo_mean", config, old, logp, adv, mask, "token-mean")
    mine, _, _ = _ours(GMPO(), old, logp, adv, mask)
    _close(mine, theirs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ratio,coef", [(2e-4, 1.0), (0.05, 1.0), (0.3, 0.1)])
@pytest.mark.parametrize("seed", SEEDS)
def test_kl_cov_equals_verl(mode, ratio, coef, seed):
    old, logp, adv, mask, w = _batch(seed)
    kw = dict(loss_mode="kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=coef)
    loss_fn = KLCov(kl_cov_ratio=ratio, ppo_kl_coef=coef, aggregation=MODES[mode])
    theirs, g_theirs = _theirs("kl_cov", _config(info=_info(mask), **kw), old, logp, adv, mask, mode, w)
    mine, g_mine, _ = _ours(loss_fn, old, logp, adv, mask, w)
    _close(mine, theirs)
    _close(g_mine, g_theirs)
    _micro_batches("kl_cov", kw, loss_fn, mode, old, logp, adv, mask, w, additive=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", [(1.0, 5.0), (0.0, 0.5), (-0.5, 2.0)])
@pytest.mark.parametrize("seed", SEEDS)
def test_clip_cov_equals_verl_when_every_candidate_is_cut(mode, window, seed):
    """clip_cov_ratio = 1: every candidate is cut, so verl's randperm and rlcredit's draw agree exactly."""
    old, logp, adv, mask, w = _batch(seed, spread=1.0)
    kw = dict(loss_mode="clip_cov", clip_cov_ratio=1.0, clip_cov_lb=window[0], clip_cov_ub=window[1],
              clip_low=0.2, clip_high=0.28)
    loss_fn = ClipCov(clip_cov_ratio=1.0, clip_cov_lb=window[0], clip_cov_ub=window[1], clip_low=0.2, clip_high=0.28,
                      aggregation=MODES[mode])
    theirs, g_theirs = _theirs("clip_cov", _config(info=_info(mask), **kw), old, logp, adv, mask, mode, w)
    mine, g_mine, _ = _ours(loss_fn, old, logp, adv, mask, w)
    _close(mine, theirs)
    _close(g_mine, g_theirs)
    _micro_batches("clip_cov", kw, loss_fn, mode, old, logp, adv, mask, w, additive=False)


@pytest.mark.parametrize("seed", SEEDS)
def test_clip_cov_random_cut_matches_verl_everywhere_else(seed):
    """A partial draw: both cut the same number of candidates, and the losses agree on every other token."""
    old, logp, adv, mask, _ = _batch(seed, B=8, T=30, spread=1.0)
    n = int(mask.sum())
    kw = dict(loss_mode="clip_cov", clip_cov_ratio=0.02, clip_cov_lb=-5.0, clip_cov_ub=5.0, clip_low=0.2, clip_high=0.2)
    _, g_theirs = _theirs("clip_cov", _config(info=_info(mask), **kw), old, logp, adv, mask, "token-mean")
    _, g_mine, _ = _ours(ClipCov(clip_cov_ratio=0.02, clip_cov_lb=-5.0, clip_cov_ub=5.0, seed=seed), old, logp, adv, mask)
    ratio = (logp - old).exp()
    clipped = (-adv * ratio.clamp(0.8, 1.2) > -adv * ratio) & mask  # PPO's clip: zero gradient in both
    cut_theirs = (g_theirs == 0) & mask & (adv != 0) & ~clipped
    cut_mine = (g_mine == 0) & mask & (adv != 0) & ~clipped
    assert int(cut_theirs.sum()) == int(cut_mine.sum()) == max(1, int(0.02 * n))
    keep = ~(cut_theirs | cut_mine)
    _close(g_mine[keep], g_theirs[keep])
