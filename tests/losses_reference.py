"""Plain-loop references of the second-wave losses, written from METHODS.md with Python floats.

Each ``ref_*`` returns ``(loss, grad)`` where ``grad[i][t]`` is d loss / d logp[i][t], derived by
hand from the formula (not by autograd), so the vectorised losses are checked against an
independent computation. Inputs are nested lists: ``logp``, ``old``, ``adv`` (per token), ``w``
(token weights), ``mask`` (bools).
"""

from __future__ import annotations

import math

__all__ = ["coefficients", "ref_cispo", "ref_sapo", "ref_gmpo", "ref_kl_cov", "ref_clip_cov", "ref_papo_terms",
           "covariance_margin"]


def coefficients(mask, w, mode, renormalize=False):
    """``c[i][t]`` with ``aggregate(l) = sum c * l`` for the four aggregations (METHODS.md's table)."""
    B, T = len(mask), len(mask[0])
    c = [[0.0] * T for _ in range(B)]
    n_tokens = sum(sum(row) for row in mask)
    w_total = sum(w[i][t] for i in range(B) for t in range(T) if mask[i][t])
    for i in range(B):
        T_i = sum(mask[i])
        w_i = sum(w[i][t] for t in range(T) if mask[i][t])
        for t in range(T):
            if not mask[i][t]:
                continue
            if mode == "token_mean":
                den = (w_total if renormalize else n_tokens) or 1.0
            elif mode == "seq_mean_token_mean":
                den = B * ((w_i if renormalize else T_i) or 1.0)
            elif mode == "seq_mean_token_sum":
                den = B
            else:
                den = B * T
            c[i][t] = w[i][t] / den
    return c


def _clamp(x, lo, hi):
    return min(max(x, lo), hi)


def _combine(c, per_token, d_per_token):
    B, T = len(c), len(c[0])
    loss = sum(c[i][t] * per_token[i][t] for i in range(B) for t in range(T) if c[i][t])
    grad = [[c[i][t] * d_per_token[i][t] if c[i][t] else 0.0 for t in range(T)] for i in range(B)]
    return loss, grad


def ref_cispo(logp, old, adv, w, mask, *, clip_low, clip_high, mode, renormalize=False):
    B, T = len(mask), len(mask[0])
    l = [[0.0] * T for _ in range(B)]
    d = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if mask[i][t]:
                rho = math.exp(_clamp(logp[i][t] - old[i][t], -20, 20))
                weight = min(rho, 1 + clip_high) if clip_low is None else _clamp(rho, 1 - clip_low, 1 + clip_high)
                l[i][t], d[i][t] = -weight * adv[i][t] * logp[i][t], -weight * adv[i][t]
    return _combine(coefficients(mask, w, mode, renormalize), l, d)


def ref_sapo(logp, old, adv, w, mask, *, tau_pos, tau_neg, mode):
    B, T = len(mask), len(mask[0])
    l = [[0.0] * T for _ in range(B)]
    d = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if mask[i][t]:
                x = logp[i][t] - old[i][t]
                rho = math.exp(_clamp(x, -20, 20))
                tau = tau_pos if adv[i][t] > 0 else tau_neg
                s = 1 / (1 + math.exp(-tau * (rho - 1)))
                l[i][t] = -(4 / tau) * s * adv[i][t]
                d[i][t] = -4 * s * (1 - s) * rho * adv[i][t] if -20 < x < 20 else 0.0
    return _combine(coefficients(mask, w, mode), l, d)


def ref_gmpo(logp, old, adv, w, mask, *, clip_low, clip_high):
    """Per row: rho_i = exp(mean_t l~_t); token loss -A_t rho_i; gradient -A_t rho_i where l~_t is l_t."""
    B, T = len(mask), len(mask[0])
    l = [[0.0] * T for _ in range(B)]
    d = [[0.0] * T for _ in range(B)]
    for i in range(B):
        tokens = [t for t in range(T) if mask[i][t]]
        kept, moves = {}, {}
        for t in tokens:
            x = _clamp(logp[i][t] - old[i][t], -20, 20)
            s = (adv[i][t] > 0) - (adv[i][t] < 0)
            if s > 0:
                kept[t], moves[t] = min(x, clip_high), x <= clip_high
            elif s < 0:
                kept[t], moves[t] = max(x, -clip_low), x >= -clip_low
            else:
                kept[t], moves[t] = 0.0, False
            moves[t] = moves[t] and -20 < logp[i][t] - old[i][t] < 20
        rho = math.exp(sum(kept.values()) / max(len(tokens), 1))
        for t in tokens:
            l[i][t] = -adv[i][t] * rho
            d[i][t] = -adv[i][t] * rho if moves[t] else 0.0
    return _combine(coefficients(mask, w, "seq_mean_token_mean"), l, d)


def _covariances(logp, adv, mask):
    cells = [(i, t) for i in range(len(mask)) for t in range(len(mask[0])) if mask[i][t]]
    n = len(cells)
    mean_a = sum(adv[i][t] for i, t in cells) / max(n, 1)
    mean_l = sum(logp[i][t] for i, t in cells) / max(n, 1)
    return cells, {(i, t): (adv[i][t] - mean_a) * (logp[i][t] - mean_l) for i, t in cells}


def covariance_margin(logp, adv, mask, thresholds):
    """The smallest gap between two covariances, or a covariance and a threshold (float32 may order them apart)."""
    _, cov = _covariances(logp, adv, mask)
    values = sorted([*cov.values(), *thresholds])
    return min((b - a for a, b in zip(values, values[1:])), default=math.inf)


def _top(cells, value, k):
    """The k cells of largest value, ties to the earlier (row, token)."""
    order = sorted(range(len(cells)), key=lambda j: (-value[cells[j]], j))
    return {cells[j] for j in order[:k]}


def ref_kl_cov(logp, old, adv, w, mask, *, ratio, coef, mode):
    B, T = len(mask), len(mask[0])
    cells, cov = _covariances(logp, adv, mask)
    chosen = _top(cells, cov, max(1, math.floor(len(cells) * ratio))) if cells else set()
    l = [[0.0] * T for _ in range(B)]
    d = [[0.0] * T for _ in range(B)]
    for i, t in cells:
        x = logp[i][t] - old[i][t]
        rho = math.exp(_clamp(x, -20, 20))
        l[i][t] = -adv[i][t] * rho
        d[i][t] = -adv[i][t] * rho if -20 < x < 20 else 0.0
        if (i, t) in chosen:
            l[i][t] += coef * abs(x)
            d[i][t] += coef * ((x > 0) - (x < 0))
    return _combine(coefficients(mask, w, mode), l, d), chosen


def ref_clip_cov(logp, old, adv, w, mask, keys, *, ratio, lb, ub, clip_low, clip_high, mode):
    """``keys[i][t]``: the uniform draws; the cut tokens are the candidates with the smallest keys."""
    B, T = len(mask), len(mask[0])
    cells, cov = _covariances(logp, adv, mask)
    l = [[0.0] * T for _ in range(B)]
    d = [[0.0] * T for _ in range(B)]
    candidates = []
    for i, t in cells:
        x = logp[i][t] - old[i][t]
        rho = math.exp(_clamp(x, -20, 20))
        a = adv[i][t]
        unclipped, clipped = -a * rho, -a * _clamp(rho, 1 - clip_low, 1 + clip_high)
        if clipped > unclipped:
            l[i][t] = clipped
        else:
            l[i][t], d[i][t] = unclipped, (-a * rho if -20 < x < 20 else 0.0)
            if lb < cov[(i, t)] < ub:
                candidates.append((i, t))
    neg_keys = {cell: -keys[cell[0]][cell[1]] for cell in candidates}
    cut = _top(candidates, neg_keys, max(1, math.floor(len(cells) * ratio))) if candidates else set()
    for i, t in cut:
        l[i][t] = d[i][t] = 0.0
    return _combine(coefficients(mask, w, mode), l, d), cut


def ref_papo_terms(logp, masked, mask, *, gamma, eta, kl_clip):
    """``-gamma * token_mean(k3) + eta * (token_mean(-logp) + token_mean(-m))`` and its two gradients."""
    B, T = len(mask), len(mask[0])
    n = max(sum(sum(row) for row in mask), 1)
    loss = 0.0
    g_lp = [[0.0] * T for _ in range(B)]
    g_m = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            x = masked[i][t] - logp[i][t]
            dc = _clamp(x, -20, 20)
            k3 = math.exp(dc) - dc - 1
            moves = -20 < x < 20 and (kl_clip is None or k3 < kl_clip)
            k3 = k3 if kl_clip is None else min(k3, kl_clip)
            dk = (math.exp(dc) - 1) if moves else 0.0  # d k3 / d x
            loss += (-gamma * k3 - eta * logp[i][t] - eta * masked[i][t]) / n
            g_lp[i][t] = (gamma * dk - eta) / n
            g_m[i][t] = (-gamma * dk - eta) / n
    return loss, g_lp, g_m
