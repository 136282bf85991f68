"""Before/after check of a refactor: every number rlcredit computes on fixed inputs, saved and compared.

Records, on fixed seeded inputs, the weights, advantages, scores, metrics, losses and gradients of
every preset that runs without a model, of each loss option, weighter, shaper and functional kernel,
of the verl entry points, and of the model-based estimators on a tiny random Qwen2-VL. Only public
names (and registry names) are used, so the same script runs against an older checkout.

Usage (from the repository root)::

    # the numbers of another checkout (e.g. a worktree of the base commit)
    PYTHONPATH=/path/to/old python scripts/compare_numbers.py save /tmp/before.pt
    # this checkout's numbers, compared with them
    python scripts/compare_numbers.py compare /tmp/before.pt

``compare`` prints one line per differing entry (max abs and relative difference) and a summary;
exit code 1 if any entry is missing or differs by more than ``--rtol``/``--atol`` (default 0: exact).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import rlcredit  # noqa: E402
from rlcredit import functional as F  # noqa: E402

Record = dict[str, torch.Tensor]


def _rollout_tensors(seed: int, B: int = 12, T: int = 9, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[3] = 0  # an empty row
    lengths[5] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    group_ids = torch.tensor([7, 7, 7, 7, -2, -2, -2, 40, 9, 9, 9, 9])[:B]  # one one-sample group (40)
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    rewards[4:7] = 0.5  # an all-equal group
    rewards[8] = 2.5
    old = -3.0 * torch.rand(B, T, generator=g)
    cur = old + 0.4 * torch.randn(B, T, generator=g)
    cur[0, 0] = old[0, 0] + 2.0  # a ratio far above every clip range (dual clip territory)
    cur[1, 1] = old[1, 1] - 2.0
    ref = old + 0.2 * torch.randn(B, T, generator=g)
    aug = old - 0.5 * torch.rand(B, T, generator=g) * (torch.rand(B, T, generator=g) < 0.5)
    entropy = 2.0 * torch.rand(B, T, generator=g)
    entropy[2, :3] = 0.75  # ties
    zero = torch.zeros(())
    return {
        "mask": mask,
        "rewards": rewards,
        "group_ids": group_ids,
        "old": torch.where(mask, old, zero).to(dtype),
        "cur": torch.where(mask, cur, zero).to(dtype),
        "ref": torch.where(mask, ref, zero).to(dtype),
        "aug": torch.where(mask, aug, zero),
        "entropy": torch.where(mask, entropy, zero),
        "adv_bt": torch.where(mask, torch.randn(B, T, generator=g), zero),
        "weights_pad": torch.rand(B, T, generator=g) * 2,  # non-zero on padding too
    }


def _rollout(t: dict[str, Any], **extra: Any) -> rlcredit.Rollout:
    fields = dict(response_mask=t["mask"], rewards=t["rewards"], group_ids=t["group_ids"],
                  old_logprobs=t["old"], ref_logprobs=t["ref"],
                  signals={"entropy": t["entropy"], "aug_logprobs": t["aug"]})
    fields.update(extra)
    return rlcredit.Rollout(**fields)


def _metrics(prefix: str, metrics: Any, out: Record) -> None:
    for key in sorted(metrics):
        out[f"{prefix}/metric/{key}"] = torch.as_tensor(metrics[key]).detach().clone().float()


def _loss_case(prefix: str, strategy: Any, rollout: Any, credit: Any, cur: torch.Tensor, out: Record,
               reducer: Any = None) -> None:
    logp = cur.clone().requires_grad_(True)
    kwargs = {} if reducer is None else {"reducer": reducer}
    res = strategy.loss(logp, rollout, credit, **kwargs)
    res.loss.backward()
    out[f"{prefix}/loss"] = res.loss.detach().float()
    out[f"{prefix}/grad"] = logp.grad.detach().float().clone()
    _metrics(prefix, res.metrics, out)


def _credit_case(prefix: str, credit: Any, out: Record) -> None:
    out[f"{prefix}/weights"] = credit.token_weights.detach().float().clone()
    out[f"{prefix}/advantages"] = credit.advantages.detach().float().clone()
    for key in sorted(credit.scores):
        out[f"{prefix}/score/{key}"] = credit.scores[key].detach().float().clone()
    _metrics(prefix, credit.metrics, out)


PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "dapo": {},
    "dr_grpo": {},
    "entropy_forks": {},
    "stapo": {},
    "vppo": {},
    "vppo_chunks": {"preset": "vppo", "shapers": ["group_normalize", {"name": "dependency_scale", "score": "visual",
                                                                     "scope": 4, "mean_scope": 2}]},
    "vppo_paper_k3": {"preset": "vppo_paper", "estimators": {"visual": {"name": "visual_kl", "estimate": "k3"}}},
    "grpo_seqmean": {"policy_loss": {"name": "clipped_surrogate", "aggregation": "seq_mean_token_mean"}},
    "gspo": {"policy_loss": "gspo"},
    "gspo_forks": {"preset": "entropy_forks", "policy_loss": {"name": "gspo", "kl_coef": 0.05, "entropy_penalty": 0.1}},
    "loo_soft": {"estimators": {"entropy": "entropy"}, "shapers": ["leave_one_out"],
                 "weighter": {"name": "soft", "normalize": True, "temperature": 0.5}},
    "mix": {"estimators": {"entropy": "entropy", "visual": {"name": "visual_kl"}},
            "weighter": {"name": "union", "parts": [
                {"name": "intersect", "parts": [{"name": "top_fraction", "fraction": 0.4, "score": "visual"},
                                                {"name": "threshold", "value": 0.5, "score": "entropy"}]},
                {"name": "complement", "part": {"name": "top_fraction", "fraction": 0.3, "score": "entropy",
                                                "scope": "group"}}]},
            "shapers": ["group_center", {"name": "dependency_scale", "score": "visual", "beta_min": 0.5,
                                          "beta_max": 1.5, "scope": "group"}]},
}


def presets(out: Record) -> None:
    for seed in (0, 1, 2):
        t = _rollout_tensors(seed)
        rollout = _rollout(t)
        for name, spec in PRESETS.items():
            strategy = rlcredit.build(spec if spec else name)
            credit = strategy.assign(rollout)
            prefix = f"preset/{name}/s{seed}"
            _credit_case(prefix, credit, out)
            _loss_case(prefix, strategy, rollout, credit, t["cur"], out)
            # Micro-batches: per-row slices of rollout and credit, gradients summed.
            logp = t["cur"].clone().requires_grad_(True)
            total = 0.0
            for rows in (torch.arange(0, 5), torch.arange(5, 12)):
                res = strategy.loss(logp[rows], rollout.select(rows), credit.select(rows))
                res.loss.backward()
                total = total + res.loss.detach()
            out[f"{prefix}/micro/loss_sum"] = torch.as_tensor(total).float()
            out[f"{prefix}/micro/grad"] = logp.grad.detach().clone()
            from rlcredit.distributed import LocalReducer
            _loss_case(f"{prefix}/local_reducer", strategy, rollout, credit, t["cur"], out, reducer=LocalReducer())


def losses(out: Record) -> None:
    t = _rollout_tensors(5)
    rollout = _rollout(t)
    credits = {
        "uniform": rlcredit.Credit({}, t["mask"].float(), torch.randn(12, generator=torch.Generator().manual_seed(3))),
        "pad_weights_bt": rlcredit.Credit({}, t["weights_pad"], t["adv_bt"]),
    }
    options = []
    for agg in F.AGGREGATIONS:
        for renorm in (False, True):
            if renorm and agg in ("seq_mean_token_sum", "seq_mean_token_sum_norm"):
                continue
            for dual in (None, 3.0):
                for kl in (0.0, 0.1):
                    for ent in (0.0, 0.06):
                        options.append(dict(aggregation=agg, renormalize=renorm, dual_clip=dual, kl_coef=kl,
                                            entropy_penalty=ent))
    options.append(dict(aggregation="seq_mean_token_sum_norm", max_length=20))
    options.append(dict(clip_low=0.1, clip_high=0.5))
    for i, opt in enumerate(options):
        loss_fn = rlcredit.get("loss", "clipped_surrogate")(**opt)
        strategy = rlcredit.Strategy(policy_loss=loss_fn)
        for cname, credit in credits.items():
            _loss_case(f"loss/clipped/{i}/{cname}", strategy, rollout, credit, t["cur"], out)
    gspo_opts = [{}, {"renormalize": True}, {"aggregation": "token_mean"}, {"kl_coef": 0.2, "entropy_penalty": 0.05},
                 {"clip_low": 0.05, "clip_high": 0.05}]
    for i, opt in enumerate(gspo_opts):
        strategy = rlcredit.Strategy(policy_loss={"name": "gspo", **opt})
        for cname, credit in credits.items():
            _loss_case(f"loss/gspo/{i}/{cname}", strategy, rollout, credit, t["cur"], out)
    # On-policy (no old log-probs) and half precision log-probs.
    onpol = rlcredit.Rollout(t["mask"], t["rewards"], t["group_ids"])
    for name in ("grpo", "dapo"):
        s = rlcredit.build(name)
        _loss_case(f"loss/onpolicy/{name}", s, onpol, s.assign(onpol), t["cur"], out)
    for dtype in (torch.bfloat16, torch.float64):
        s = rlcredit.build("vppo")
        c = s.assign(rollout)
        _loss_case(f"loss/dtype/{dtype}", s, rollout, c, t["cur"].to(dtype), out)


def functional(out: Record) -> None:
    t = _rollout_tensors(7)
    mask, x = t["mask"], t["cur"]
    for mode in F.AGGREGATIONS:
        out[f"F/aggregate/{mode}"] = F.aggregate(x, mask, mode=mode)
        out[f"F/aggregate_w/{mode}"] = F.aggregate(x, mask, t["weights_pad"], mode=mode)
        out[f"F/coef/{mode}"] = F.loss_coefficients(mask, t["weights_pad"], mode=mode)
        if mode in ("token_mean", "seq_mean_token_mean"):
            out[f"F/coef_renorm/{mode}"] = F.loss_coefficients(mask, t["weights_pad"], mode=mode, renormalize=True)
    out["F/k3"] = F.k3_kl(t["cur"], t["ref"], mask)
    out["F/masked_mean"] = F.masked_mean(x, mask)
    out["F/group_normalize"] = F.group_normalize(t["rewards"], t["group_ids"])
    out["F/group_center"] = F.group_center(t["rewards"], t["group_ids"])
    out["F/leave_one_out"] = F.leave_one_out(t["rewards"], t["group_ids"])
    for scope in F.SCOPES:
        for frac in (0.2, 0.4, 1.0):
            out[f"F/top/{scope}/{frac}"] = F.top_fraction_mask(t["entropy"], mask, frac, scope,
                                                              group_ids=t["group_ids"]).float()
    loss, clipped = F.clipped_surrogate(t["cur"], t["old"], t["adv_bt"], dual_clip=3.0, mask=mask)
    out["F/clipped_surrogate"], out["F/is_clipped"] = loss, clipped.float()
    g = torch.Generator().manual_seed(11)
    B, T, V, H = 3, 5, 37, 8
    vmask = torch.rand(B, T, generator=g) < 0.8
    lp_ = torch.randn(B, T, V, generator=g) * 3
    lq_ = torch.randn(B, T, V, generator=g) * 3
    lp = lp_.clone().requires_grad_(True)
    lq = lq_.clone().requires_grad_(True)
    kl = F.token_kl(lp, lq, vmask)
    kl.sum().backward()
    out["F/token_kl"], out["F/token_kl/grad_p"], out["F/token_kl/grad_q"] = kl.detach(), lp.grad, lq.grad
    lp = lp_.clone().requires_grad_(True)
    ent = F.token_entropy(lp, mask=vmask) if "mask" in F.token_entropy.__code__.co_varnames else F.token_entropy(lp)
    ent.sum().backward()
    out["F/token_entropy"], out["F/token_entropy/grad"] = ent.detach(), lp.grad
    lp = lp_.clone().requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=g)
    sl = F.selected_logprobs(lp, ids)
    sl.sum().backward()
    out["F/selected_logprobs"], out["F/selected_logprobs/grad"] = sl.detach(), lp.grad
    hp, hq, w = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    out["F/fused_token_kl"] = F.fused_token_kl(hp, hq, w, vmask)
    alpha = F.dependency_scale(torch.rand(12, generator=g), torch.ones(12, dtype=torch.bool), beta_min=0.9)
    out["F/dependency_scale"] = alpha


def verl(out: Record) -> None:
    from rlcredit.integrations import verl as V

    t = _rollout_tensors(9)
    mask = t["mask"]
    isw = torch.rand(12, 9, generator=torch.Generator().manual_seed(4)) + 0.5
    for name in ("grpo", "dapo", "dr_grpo", "vppo"):
        cfgs = {
            "plain": {"rlcredit_strategy": name},
            "global": {"rlcredit_strategy": name, "global_batch_info": {"dp_size": 2, "batch_num_tokens": 150,
                                                                         "global_batch_size": 30,
                                                                         "loss_scale_factor": 16}},
        }
        for cname, cfg in cfgs.items():
            for w in (None, isw):
                logp = t["cur"].clone().requires_grad_(True)
                agg = {"grpo": "token-mean", "dapo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
                       "vppo": "token-mean"}[name]
                import warnings
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    loss, metrics = V.compute_policy_loss(t["old"], logp, t["adv_bt"], mask, agg, cfg, w)
                loss.backward()
                p = f"verl/loss/{name}/{cname}/{'isw' if w is not None else 'none'}"
                out[f"{p}/loss"], out[f"{p}/grad"] = loss.detach(), logp.grad
                for k in sorted(metrics):  # whatever keys this checkout emits (verl's, since issue 15)
                    out[f"{p}/metric/{k}"] = torch.as_tensor(metrics[k]).float()
    rewards = torch.zeros(12, 9)
    rewards[:, -1] = t["rewards"]
    uid = [str(int(i)) for i in t["group_ids"]]
    adv, _ = V.compute_advantage(rewards, mask, index=uid, config={"rlcredit_strategy": "grpo"})
    out["verl/adv/grpo"] = adv
    batch = {"response_mask": mask, "uid": uid, "token_level_rewards": rewards, "entropys": t["entropy"],
             "old_log_probs": t["old"]}
    V.apply_credit(batch, credit="entropy_forks")
    out["verl/apply_credit/entropy_forks"] = batch["advantages"]


def models(out: Record) -> None:
    root = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or os.getcwd()
    sys.path.insert(0, root)
    from tests.mm_models import make_vlm

    model, make_inputs = make_vlm("qwen2_vl", seed=0)
    inputs, mask = make_inputs(B=4, T=6, seed=1, lengths=[6, 4, 1, 5])
    policy = rlcredit.HFPolicy(model)
    stats = policy.response_stats(inputs, mask, entropy=True)
    out["model/logprobs"], out["model/entropy"] = stats.logprobs, stats.entropy
    old = stats.logprobs
    rollout = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1]),
                               old_logprobs=old, model_inputs=inputs)
    for est in ("k3", "exact", "fused"):
        s = rlcredit.build("vppo", estimators={"visual": {"name": "visual_kl", "estimate": est}})
        _credit_case(f"model/vppo/{est}", s.assign(rollout, policy), out)
    s = rlcredit.build("at_rl")
    _credit_case("model/at_rl", s.assign(rollout, policy), out)
    lp = policy.logprobs(inputs, mask)
    lp.sum().backward()
    out["model/grad_norm"] = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).sum()


SECTIONS: dict[str, Callable[[Record], None]] = {
    "presets": presets, "losses": losses, "functional": functional, "verl": verl, "models": models,
}


def collect() -> Record:
    out: Record = {}
    for name, fn in SECTIONS.items():
        torch.manual_seed(0)
        fn(out)
    return {k: v.detach().cpu() for k, v in out.items()}


def compare(before: Record, after: Record, rtol: float, atol: float) -> int:
    bad = 0
    worst = 0.0
    for key in sorted(before):
        a, b = before[key], after.get(key)
        if b is None:
            print(f"MISSING  {key}")
            bad += 1
            continue
        if a.shape != b.shape:
            print(f"SHAPE    {key}: {list(a.shape)} -> {list(b.shape)}")
            bad += 1
            continue
        a64, b64 = a.double(), b.double()
        both_nan = torch.isnan(a64) & torch.isnan(b64)
        diff = torch.where(both_nan, 0.0, (a64 - b64).abs())
        d = float(diff.max()) if diff.numel() else 0.0
        if math.isnan(d) or not torch.all(diff <= atol + rtol * b64.abs().nan_to_num(0.0)):
            scale = float(a64.abs().max()) if a64.numel() else 0.0
            print(f"DIFF     {key}: max abs {d:.3g} (max |before| {scale:.3g})")
            bad += 1
        worst = max(worst, d if not math.isnan(d) else float("inf"))
    extra = sorted(set(after) - set(before))
    print(f"{len(before)} entries compared, {bad} differ or are missing, largest abs difference {worst:.3g}; "
          f"{len(extra)} new entries.")
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("save", "compare"))
    parser.add_argument("path")
    parser.add_argument("--rtol", type=float, default=0.0)
    parser.add_argument("--atol", type=float, default=0.0)
    args = parser.parse_args()
    numbers = collect()
    if args.command == "save":
        torch.save(numbers, args.path)
        print(f"saved {len(numbers)} entries to {args.path}")
        return 0
    return compare(torch.load(args.path), numbers, args.rtol, args.atol)


if __name__ == "__main__":
    sys.exit(main())
