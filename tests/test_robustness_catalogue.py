"""A catalogue of hostile-but-ordinary bad and edge inputs (issue #14), written from the user's side.

Each entry of ``RAISES`` is a mistake a user makes on an ordinary day (a misspelt spec key, a list
of bools as rows, float64 rewards of 1e300, a raw transformers model as the policy...) and says
which ``RLCreditError`` it must raise and the key words its message must carry: what was wrong,
what was expected, how to fix it. Each entry of ``VALUES`` is an edge input that is legal and
must give a finite, correct value (checked against a hand-computed one). The full-vocabulary
kernels' cases live in ``test_robustness_logits.py``.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch

import rlcredit
from rlcredit import AdapterError, RegistryError, RLCreditError, RolloutError, SpecError
from rlcredit import functional as F
from rlcredit.distributed import LocalReducer
from rlcredit.losses import GSPO, ClippedSurrogate
from rlcredit.registry import component_spec
from rlcredit.shapers import DependencyScale, GroupNormalize
from rlcredit.weighters import SoftWeight, Stapo, Threshold, TopFraction, Uniform

INF, NAN = math.inf, math.nan
F32_MAX = torch.finfo(torch.float32).max
MASK = torch.tensor([[True, True, False], [True, False, False]])


# --------------------------------------------------------------------------- builders


def rollout(**kw: Any) -> rlcredit.Rollout:
    """A valid [2, 3] rollout (rows of 2 and 1 valid tokens, one group); ``kw`` replaces fields."""
    fields = {"response_mask": MASK, "rewards": torch.tensor([1.0, 0.0]), "group_ids": torch.tensor([0, 0])}
    fields.update(kw)
    return rlcredit.Rollout(**fields)


def credit(**kw: Any) -> rlcredit.Credit:
    fields = {"scores": {}, "token_weights": MASK.float(), "advantages": torch.tensor([1.0, -1.0])}
    fields.update(kw)
    return rlcredit.Credit(**fields)


def grpo() -> rlcredit.Strategy:
    return rlcredit.build("grpo")


def loss_of(strategy: rlcredit.Strategy, logprobs: Any, r: Any = None, c: Any = None, **kw: Any):
    r = rollout(old_logprobs=torch.zeros(2, 3)) if r is None else r
    c = strategy.assign(r) if c is None else c
    return strategy.loss(logprobs, r, c, **kw)


def spec_file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


_TMP = tempfile.TemporaryDirectory(prefix="rlcredit-catalogue-")  # removed when the test process exits


def _tmp() -> Path:
    """A fresh folder for one case (the cases are built at import time, so no tmp_path fixture)."""
    return Path(tempfile.mkdtemp(dir=_TMP.name))


@attrs.frozen
class Returns:
    """A test component returning a fixed value: the checks on component outputs, built-in or third-party."""

    value: Any
    requires = ()

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.value


@attrs.frozen
class Unregistered:
    requires = ()

    def __call__(self, scores, rollout, *, reducer=None):
        return rollout.float_mask


class NoRanks(LocalReducer):
    world_size = 0


def tiny_policy() -> rlcredit.HFPolicy:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    return rlcredit.HFPolicy(Qwen2ForCausalLM(cfg).eval())


def stats(model_inputs: Any, mask: Any = None, **kw: Any):
    mask = torch.ones(1, 2, dtype=torch.bool) if mask is None else mask
    return tiny_policy().response_stats(model_inputs, mask, **kw)


def with_override(kind: str, name: str, build: Callable[[], Any]) -> Any:
    """Run ``build`` while another class holds ``(kind, name)``; the registration is restored after."""
    original = rlcredit.get(kind, name)

    @attrs.frozen
    class Impostor:
        requires = ()

        def __call__(self, scores, rollout, *, reducer=None):
            return rollout.float_mask

    rlcredit.register(kind, name, override=True)(Impostor)
    try:
        return build()
    finally:
        rlcredit.register(kind, name, override=True)(original)


def register_fresh(obj: Any) -> Any:
    return rlcredit.register("weighter", "_catalogue_fresh")(obj)


# --------------------------------------------------------------------------- errors

R = RolloutError
S = SpecError
G = RegistryError
E = RLCreditError
A = AdapterError

RAISES: list[tuple[str, Callable[[], Any], type, list[str]]] = [
    # --- Rollout: shapes, dtypes, devices, layouts
    ("mask_is_a_list", lambda: rollout(response_mask=[[True, False]]), R, ["response_mask", "torch.Tensor"]),
    ("mask_is_int", lambda: rollout(response_mask=MASK.long()), R, ["torch.bool", ".bool()"]),
    ("mask_is_1d", lambda: rollout(response_mask=torch.ones(2, dtype=torch.bool)), R, ["2-D [B, T]"]),
    ("mask_is_3d", lambda: rollout(response_mask=MASK[..., None]), R, ["2-D [B, T]"]),
    ("no_rows", lambda: rollout(response_mask=torch.ones(0, 3, dtype=torch.bool), rewards=torch.zeros(0),
                                group_ids=torch.zeros(0, dtype=torch.long)), R, ["no rows", "at least one"]),
    ("rewards_wrong_length", lambda: rollout(rewards=torch.zeros(3)), R, ["rewards has shape [3]", "expected [2]"]),
    ("rewards_2d", lambda: rollout(rewards=torch.zeros(2, 1)), R, ["rewards has shape [2, 1]"]),
    ("rewards_a_list", lambda: rollout(rewards=[1.0, 0.0]), R, ["rewards must be a torch.Tensor", "list"]),
    ("rewards_numpy", lambda: rollout(rewards=np.array([1.0, 0.0])), R, ["rewards must be a torch.Tensor",
                                                                          "ndarray"]),
    ("rewards_complex", lambda: rollout(rewards=torch.tensor([1.0, 0.0], dtype=torch.complex64)), R,
     ["rewards must be a floating tensor"]),
    ("rewards_nan", lambda: rollout(rewards=torch.tensor([NAN, 0.0])), R, ["rewards contains 1 non-finite"]),
    ("rewards_inf", lambda: rollout(rewards=torch.tensor([INF, -INF])), R, ["rewards contains 2 non-finite"]),
    ("rewards_float64_1e300", lambda: rollout(rewards=torch.tensor([1e300, 0.0], dtype=torch.float64)), R,
     ["rewards", "float32's range", "rescale"]),
    ("rewards_float64_-1e39", lambda: rollout(rewards=torch.tensor([-1e39, 0.0], dtype=torch.float64)), R,
     ["float32's range"]),
    ("group_ids_float", lambda: rollout(group_ids=torch.tensor([0.0, 0.0])), R, ["group_ids", "integer", ".long()"]),
    ("group_ids_bool", lambda: rollout(group_ids=torch.tensor([True, False])), R, ["group_ids", "integer"]),
    ("group_ids_a_list", lambda: rollout(group_ids=[0, 0]), R, ["group_ids must be a torch.Tensor"]),
    ("group_ids_wrong_length", lambda: rollout(group_ids=torch.tensor([0])), R, ["group_ids has shape [1]"]),
    ("old_logprobs_int", lambda: rollout(old_logprobs=torch.zeros(2, 3, dtype=torch.long)), R,
     ["old_logprobs must be a floating tensor"]),
    ("old_logprobs_transposed", lambda: rollout(old_logprobs=torch.zeros(3, 2)), R,
     ["old_logprobs has shape [3, 2]", "expected [2, 3]"]),
    ("old_logprobs_nan_on_padding", lambda: rollout(old_logprobs=torch.tensor([[0.0, 0.0, NAN], [0.0] * 3])), R,
     ["old_logprobs contains 1 non-finite", "padding positions included", "fill them with 0"]),
    ("ref_logprobs_-inf", lambda: rollout(ref_logprobs=torch.full((2, 3), -INF)), R,
     ["ref_logprobs contains 6 non-finite"]),
    ("old_logprobs_float64_-1e300", lambda: rollout(old_logprobs=torch.full((2, 3), -1e300, dtype=torch.float64)),
     R, ["old_logprobs", "float32's range"]),
    ("signals_a_list", lambda: rollout(signals=[1, 2]), R, ["Rollout.signals must be a mapping", "list"]),
    ("signals_int_key", lambda: rollout(signals={1: torch.zeros(2, 3)}), R, ["signals keys must be strings"]),
    ("signals_value_a_list", lambda: rollout(signals={"entropy": [[0.0] * 3] * 2}), R,
     ["signals['entropy'] must be a torch.Tensor"]),
    ("signals_complex", lambda: rollout(signals={"x": torch.zeros(2, 3, dtype=torch.complex64)}), R,
     ["signals['x'] must hold real values"]),
    ("signals_per_row", lambda: rollout(signals={"x": torch.zeros(2)}), R, ["signals['x'] has shape [2]"]),
    ("signals_inf", lambda: rollout(signals={"entropy": torch.full((2, 3), INF)}), R, ["non-finite"]),
    ("model_inputs_an_int", lambda: rollout(model_inputs=5), R, ["model_inputs must be a mapping", "int"]),
    ("model_inputs_float_ids", lambda: rollout(model_inputs={"input_ids": torch.zeros(2, 5)}), R,
     ["input_ids", "integer tensor", ".long()"]),
    ("model_inputs_complex_ids", lambda: rollout(model_inputs={"input_ids": torch.zeros(2, 5,
                                                                                      dtype=torch.complex64)}),
     R, ["input_ids", "integer tensor"]),
    ("model_inputs_negative_ids", lambda: rollout(model_inputs={"input_ids": -torch.ones(2, 5, dtype=torch.long)}),
     R, ["negative token ids", "pad token id"]),
    ("model_inputs_ids_shorter_than_T", lambda: rollout(model_inputs={"input_ids": torch.zeros(2, 2,
                                                                                             dtype=torch.long)}),
     R, ["[B, P+T]", "last T columns"]),
    ("model_inputs_attention_mismatch", lambda: rollout(model_inputs={"input_ids": torch.zeros(2, 5, dtype=torch.long),
                                                                      "attention_mask": torch.ones(2, 4)}),
     R, ["attention_mask'] must match input_ids"]),
    ("model_inputs_int_key", lambda: rollout(model_inputs={0: torch.zeros(2, 5, dtype=torch.long)}), R,
     ["model_inputs keys must be", "strings"]),
    ("response_ids_float", lambda: rollout(response_ids=torch.zeros(2, 3)), R, ["response_ids", "integer"]),
    ("response_ids_negative", lambda: rollout(response_ids=-torch.ones(2, 3, dtype=torch.long)), R,
     ["negative token ids"]),
    ("sparse_mask", lambda: rollout(response_mask=MASK.to_sparse()), R, ["response_mask is a sparse_coo tensor",
                                                                         ".to_dense()"]),
    ("sparse_rewards", lambda: rollout(rewards=torch.tensor([1.0, 0.0]).to_sparse()), R, ["rewards", "sparse"]),
    ("meta_rollout", lambda: rollout(response_mask=MASK.to("meta"), rewards=torch.zeros(2, device="meta"),
                                     group_ids=torch.zeros(2, dtype=torch.long, device="meta")), R,
     ["meta device", "holds values"]),
    ("meta_rewards", lambda: rollout(rewards=torch.zeros(2, device="meta")), R, ["rewards is on the meta device"]),
    # --- row selection: one rule for Rollout.select and Credit.select
    ("select_float_in_list", lambda: rollout().select([0.5]), R, ["ints (row indices) or bools", "0.5 (float)"]),
    ("select_negative", lambda: rollout().select([-1]), R, ["[0, 2)", "no negative"]),
    ("select_out_of_range", lambda: rollout().select([5]), R, ["[0, 2)", "max 5"]),
    ("select_negative_tensor", lambda: rollout().select(torch.tensor([-1])), R, ["[0, 2)"]),
    ("select_empty_list", lambda: rollout().select([]), R, ["selected no rows"]),
    ("credit_select_empty_list", lambda: credit().select([]), R, ["selected no rows"]),
    ("select_all_false", lambda: rollout().select([False, False]), R, ["selected no rows"]),
    ("select_bool_list_too_long", lambda: rollout().select([True, False, True]), R, ["bool mask must have shape [2]"]),
    ("select_bool_tensor_too_short", lambda: credit().select(torch.tensor([True])), R, ["shape [2]"]),
    ("select_mixed_bools_and_ints", lambda: rollout().select([True, 1]), R, ["either ints", "or bools"]),
    ("select_float_tensor", lambda: rollout().select(torch.tensor([0.0])), R, ["1-D integer row indices"]),
    ("select_2d_tensor", lambda: rollout().select(torch.tensor([[0]])), R, ["1-D integer row indices"]),
    ("select_bare_int", lambda: rollout().select(1), R, ["for one row write [1]"]),
    ("select_string", lambda: rollout().select("0"), R, ["takes row indices", "str"]),
    ("select_none", lambda: credit().select(None), R, ["takes row indices", "NoneType"]),
    ("select_slice_step_0", lambda: rollout().select(slice(None, None, 0)), R, ["non-zero step"]),
    ("select_slice_of_floats", lambda: rollout().select(slice(0.0, 1.0)), R, ["slice needs int"]),
    ("select_numpy_floats", lambda: rollout().select(np.array([0.0])), R, ["NumPy array of float64"]),
    ("select_sparse_index", lambda: rollout().select(torch.tensor([0]).to_sparse()), R, ["sparse"]),
    # --- Credit and LossOutput
    ("credit_negative_weight", lambda: credit(token_weights=torch.tensor([[1.0, -0.5, 0.0], [1.0, 0.0, 0.0]])), R,
     ["token_weights holds 1 negative value(s)", "[0, 1e+20]", "Put signs in the advantages"]),
    ("credit_weight_1e30", lambda: credit(token_weights=torch.full((2, 3), 1e30)), R,
     ["6 above 1e+20 value(s)", "rescale relative weights"]),
    ("credit_nan_weight", lambda: credit(token_weights=torch.full((2, 3), NAN)), R, ["token_weights", "non-finite"]),
    ("credit_int_weights", lambda: credit(token_weights=torch.ones(2, 3, dtype=torch.long)), R, ["floating"]),
    ("credit_1d_weights", lambda: credit(token_weights=torch.ones(3)), R, ["[B, T]"]),
    ("credit_advantages_wrong_shape", lambda: credit(advantages=torch.zeros(3)), R, ["[B] = [2] or [B, T] = [2, 3]"]),
    ("credit_nan_advantage", lambda: credit(advantages=torch.tensor([NAN, 0.0])), R, ["advantages", "non-finite"]),
    ("credit_scores_a_list", lambda: credit(scores=[1]), R, ["Credit.scores must be a mapping"]),
    ("credit_scores_int_key", lambda: credit(scores={0: torch.zeros(2, 3)}), R, ["score names (strings)"]),
    ("credit_metrics_a_list", lambda: credit(metrics=[1]), R, ["Credit.metrics must be a mapping"]),
    ("token_advantages_float_mask", lambda: credit().token_advantages(MASK.float()), R, ["bool tensor"]),
    ("loss_output_vector", lambda: rlcredit.LossOutput(torch.ones(2)), R, ["scalar tensor"]),
    ("estimator_output_extras_list", lambda: rlcredit.EstimatorOutput(torch.zeros(2, 3), extras=[1]), R,
     ["EstimatorOutput.extras must be a mapping"]),
    # --- Strategy construction and specs
    ("class_instead_of_instance", lambda: rlcredit.Strategy(weighter=Uniform), S, ["got the class Uniform",
                                                                                  "instantiate it"]),
    ("object_as_weighter", lambda: rlcredit.Strategy(weighter=object()), S, ["registered name", "weighter object"]),
    ("int_as_weighter", lambda: rlcredit.Strategy(weighter=5), S, ["expected a weighter"]),
    ("none_as_weighter", lambda: rlcredit.Strategy(weighter=None), S, ["expected a weighter"]),
    ("shapers_a_string", lambda: rlcredit.Strategy(shapers="group_normalize"), S, ["expected a list of shapers"]),
    ("shapers_none", lambda: rlcredit.Strategy(shapers=None), S, ["expected a list of shapers"]),
    ("estimators_a_list", lambda: rlcredit.Strategy(estimators=["entropy"]), S, ["mapping score-name -> estimator"]),
    ("score_name_with_dot", lambda: rlcredit.Strategy(estimators={"a.b": "entropy"}), S, ["without '.'"]),
    ("score_nobody_produces", lambda: rlcredit.Strategy(weighter={"name": "top_fraction", "fraction": 0.5,
                                                                  "score": "visual"}), S,
     ["reads score 'visual'", "no estimator produces"]),
    ("unnamed_score_two_estimators", lambda: rlcredit.Strategy(
        estimators={"a": "entropy", "b": "uniform"}, weighter={"name": "top_fraction", "fraction": 0.5}), S,
     ["unnamed score", "pass score=NAME"]),
    ("build_empty_string", lambda: rlcredit.build(""), S, ["empty string", "presets: "]),
    ("build_a_folder", lambda: rlcredit.build(str(_tmp())), S, ["is a folder, not a spec file"]),
    ("build_missing_file", lambda: rlcredit.build("no_such_spec.json"), S, ["no_such_spec.json", "does not exist"]),
    ("build_misspelt_preset", lambda: rlcredit.build("dr-grpo"), G, ["did you mean 'dr_grpo'", "No file 'dr-grpo'"]),
    ("build_none", lambda: rlcredit.build(None), S, ["preset name, a spec dict", "NoneType"]),
    ("build_a_list", lambda: rlcredit.build(["grpo"]), S, ["preset name", "list"]),
    ("build_non_utf8_file", lambda: rlcredit.build(spec_file(_tmp(), "s.json", b'{"preset": "\xff"}')), S,
     ["not UTF-8", "save it as UTF-8"]),
    ("build_bad_json", lambda: rlcredit.build(spec_file(_tmp(), "s.json", b"{preset: grpo}")), S,
     ["could not be parsed"]),
    ("build_txt_file", lambda: rlcredit.build(spec_file(_tmp(), "s.txt", b"{}")), S, ["unknown extension '.txt'"]),
    ("build_file_of_a_list", lambda: rlcredit.build(spec_file(_tmp(), "s.json", b"[1]")), S,
     ["must hold a mapping"]),
    ("build_unknown_override", lambda: rlcredit.build("grpo", loss="x"), S, ["unknown override(s) 'loss'",
                                                                             "policy_loss"]),
    ("build_unknown_key", lambda: rlcredit.build({"weigher": "uniform"}), S, ["unknown key(s) 'weigher'",
                                                                            "weighter"]),
    ("build_preset_not_a_string", lambda: rlcredit.build({"preset": 5}), S, ["'preset' names a registered preset"]),
    ("spec_missing_required_parameter", lambda: rlcredit.build({"weighter": "top_fraction"}), S,
     ["top_fraction", "required parameter(s): fraction"]),
    ("spec_without_name", lambda: rlcredit.build({"weighter": {"fraction": 0.2}}), S, ["needs a 'name' key"]),
    ("spec_misspelt_parameter", lambda: rlcredit.build({"weighter": {"name": "top_fraction", "fracton": 0.2}}), S,
     ["unknown parameter(s) 'fracton'", "accepted: fraction"]),
    ("spec_name_not_a_string", lambda: rlcredit.build({"weighter": {"name": 5}}), S, ["'name' key"]),
    ("spec_intersect_of_nothing", lambda: rlcredit.build({"weighter": {"name": "intersect", "parts": []}}), S,
     ["at least one weighter"]),
    ("spec_intersect_parts_a_string", lambda: rlcredit.build({"weighter": {"name": "intersect", "parts": "uniform"}}),
     S, ["expected a list of weighters"]),
    ("spec_shapers_a_dict", lambda: rlcredit.build({"shapers": {"name": "group_center"}}), S,
     ["expected a list of shapers"]),
    ("spec_misspelt_estimator", lambda: rlcredit.build({"estimators": {"v": "visual_kll"}}), G,
     ["did you mean 'visual_kl'"]),
    # --- hyper-parameters: finite, float32-sized, in range; from Python and from specs alike
    ("kl_coef_inf", lambda: ClippedSurrogate(kl_coef=INF), S, ["kl_coef must be a finite number", "[0.0, inf)"]),
    ("kl_coef_json_infinity", lambda: rlcredit.build(json.loads(
        '{"policy_loss": {"name": "clipped_surrogate", "kl_coef": Infinity}}')), S, ["kl_coef", "finite"]),
    ("kl_coef_json_nan", lambda: rlcredit.build(json.loads(
        '{"policy_loss": {"name": "clipped_surrogate", "kl_coef": NaN}}')), S, ["kl_coef", "finite"]),
    ("beta_max_1e308", lambda: DependencyScale(beta_max=1e308), S, ["beta_max", "float32's range"]),
    ("entropy_penalty_1e308", lambda: ClippedSurrogate(entropy_penalty=1e308), S, ["entropy_penalty",
                                                                                    "float32's range"]),
    ("eps_inf", lambda: GroupNormalize(eps=INF), S, ["GroupNormalize.eps must be a finite number"]),
    ("eps_1e300_from_json", lambda: rlcredit.build({"shapers": [{"name": "group_normalize", "eps": 1e300}]}), S,
     ["eps", "float32"]),
    ("w_anchor_inf", lambda: rlcredit.build({"estimators": {"c": "attention_connectivity"},
                                             "weighter": {"name": "anchor_clusters", "w_anchor": INF}}), S,
     ["w_anchor must be a finite number"]),
    ("w_anchor_beyond_token_weights", lambda: rlcredit.build({"estimators": {"c": "attention_connectivity"},
                                                              "weighter": {"name": "anchor_clusters", "w_anchor": 1e30}}),
     S, ["w_anchor must be a number in [0.0, 1e+20]"]),
    ("clip_low_1", lambda: ClippedSurrogate(clip_low=1.0), S, ["clip_low must be a number in [0.0, 1.0)"]),
    ("clip_low_negative", lambda: ClippedSurrogate(clip_low=-0.1), S, ["clip_low", "[0.0, 1.0)"]),
    ("clip_high_a_string", lambda: ClippedSurrogate(clip_high="0.2"), S, ["clip_high", "got '0.2' (str)"]),
    ("dual_clip_1", lambda: ClippedSurrogate(dual_clip=1.0), S, ["dual_clip must be a number in (1.0, inf)"]),
    ("fraction_0", lambda: TopFraction(0.0), S, ["fraction must be a number in (0.0, 1.0]"]),
    ("fraction_true", lambda: TopFraction(True), S, ["got True (bool)"]),
    ("fraction_1.5_from_spec", lambda: rlcredit.build({"estimators": {"e": "entropy"},
                                                       "weighter": {"name": "top_fraction", "fraction": 1.5}}), S,
     ["fraction", "(0.0, 1.0]"]),
    ("entropy_temperature_0", lambda: rlcredit.estimators.Entropy(temperature=0), S, ["temperature", "(0.0, inf)"]),
    ("soft_temperature_negative", lambda: SoftWeight(temperature=-1.0), S, ["SoftWeight.temperature"]),
    ("max_length_0", lambda: ClippedSurrogate(aggregation="seq_mean_token_sum_norm", max_length=0), S,
     ["max_length must be an int >= 1"]),
    ("max_length_float", lambda: ClippedSurrogate(aggregation="seq_mean_token_sum_norm", max_length=2.5), S,
     ["max_length must be an int"]),
    ("max_length_2_pow_70", lambda: ClippedSurrogate(aggregation="seq_mean_token_sum_norm", max_length=2**70), S,
     ["at most 2**63 - 1"]),
    ("aggregation_unknown", lambda: ClippedSurrogate(aggregation="mean"), S, ["must be one of", "'token_mean'"]),
    ("ratio_unknown", lambda: ClippedSurrogate(ratio="seq"), S, ["ratio must be one of", "'sequence'"]),
    ("renormalize_an_int", lambda: ClippedSurrogate(renormalize=1), S, ["True or False"]),
    ("beta_min_2_mean_preserving", lambda: DependencyScale(beta_min=2.0), S, ["beta_min must be in [0, 1]"]),
    ("beta_max_below_beta_min", lambda: DependencyScale(beta_max=0.5), S, ["greater than beta_min"]),
    ("scope_a_float", lambda: DependencyScale(scope=1.5), S, ["'batch', 'group' or an int >= 1"]),
    ("prob_threshold_0", lambda: Stapo(prob_threshold=0.0), S, ["prob_threshold", "(0.0, 1.0]"]),
    ("threshold_-inf", lambda: Threshold(-INF), S, ["Threshold.value must be a finite number"]),
    ("renormalize_without_token_count", lambda: ClippedSurrogate(renormalize=True, aggregation="seq_mean_token_sum"),
     S, ["renormalize=True needs a token-count denominator"]),
    ("max_length_with_token_mean", lambda: ClippedSurrogate(max_length=10), S, ["only used by aggregation"]),
    ("gspo_clip_low_1", lambda: GSPO(clip_low=1.0), S, ["GSPO.clip_low"]),
    ("policy_rows_per_chunk_1.5", lambda: rlcredit.HFPolicy(torch.nn.Linear(1, 1), rows_per_chunk=1.5), S,
     ["rows_per_chunk must be an int >= 1"]),
    ("policy_tokens_per_chunk_0", lambda: rlcredit.HFPolicy(torch.nn.Linear(1, 1), tokens_per_chunk=0), S,
     ["tokens_per_chunk must be an int >= 1"]),
    # --- registry
    ("register_an_int", lambda: rlcredit.register("weighter", "_x")(5), G, ["register a class", "int 5"]),
    ("register_an_instance", lambda: rlcredit.register("weighter", "_x")(Uniform()), G, ["register a class",
                                                                                         "Uniform"]),
    ("register_a_lambda", lambda: rlcredit.register("weighter", "_x")(lambda: 1), G, ["register a class",
                                                                                      "function"]),
    ("register_non_attrs_class", lambda: rlcredit.register("weighter", "_x")(type("Plain", (), {})), G,
     ["not an attrs class", "@attrs.frozen"]),
    ("register_unknown_kind", lambda: rlcredit.register("thing", "_x"), G, ["unknown kind 'thing'"]),
    ("register_empty_name", lambda: rlcredit.register("weighter", ""), G, ["non-empty string"]),
    ("register_taken_name", lambda: rlcredit.register("weighter", "uniform")(TopFraction), G,
     ["already registered", "override=True"]),
    ("get_int_name", lambda: rlcredit.get("weighter", 5), G, ["names are strings"]),
    ("available_unknown_kind", lambda: rlcredit.available("things"), G, ["unknown kind 'things'"]),
    ("to_spec_unregistered", lambda: rlcredit.Strategy(weighter=Unregistered()).to_spec(), S,
     ["Unregistered is not a registered attrs component", "@rlcredit.register"]),
    ("to_spec_after_override", lambda: with_override("weighter", "uniform", lambda: grpo().to_spec()), S,
     ["Uniform cannot be written as a spec", "override=True) gave that name", "Impostor"]),
    # --- Strategy.assign and Strategy.loss
    ("assign_none", lambda: grpo().assign(None), R, ["takes a rlcredit.Rollout", "NoneType"]),
    ("assign_raw_module", lambda: grpo().assign(rollout(), policy=torch.nn.Linear(2, 2)), R,
     ["raw Linear", "rlcredit.HFPolicy(model)"]),
    ("assign_policy_a_string", lambda: grpo().assign(rollout(), policy="Qwen/Qwen2-0.5B"), R,
     ["policy must be a rlcredit.HFPolicy"]),
    ("assign_reducer_a_string", lambda: grpo().assign(rollout(), reducer="x"), E,
     ["reducer must be None", "TorchDistributedReducer", "lacks world_size"]),
    ("assign_reducer_object", lambda: grpo().assign(rollout(), reducer=object()), E, ["lacks world_size, sum"]),
    ("assign_reducer_world_size_0", lambda: grpo().assign(rollout(), reducer=NoRanks()), E, ["world_size is 0"]),
    ("loss_reducer_a_string", lambda: loss_of(grpo(), torch.zeros(2, 3), reducer="x"), E, ["reducer must be None"]),
    ("loss_credit_a_dict", lambda: loss_of(grpo(), torch.zeros(2, 3), c={"advantages": 1}), R,
     ["takes a rlcredit.Credit", "dict"]),
    ("loss_rollout_none", lambda: grpo().loss(torch.zeros(2, 3), None, credit()), R, ["takes a rlcredit.Rollout"]),
    ("loss_logprobs_a_list", lambda: loss_of(grpo(), [[0.0] * 3] * 2), R, ["logprobs must be [B, T] = [2, 3]"]),
    ("loss_logprobs_transposed", lambda: loss_of(grpo(), torch.zeros(3, 2)), R, ["got [3, 2]", "select(rows)"]),
    ("loss_logprobs_int", lambda: loss_of(grpo(), torch.zeros(2, 3, dtype=torch.long)), R, ["must be floating"]),
    ("loss_logprobs_sparse", lambda: loss_of(grpo(), torch.zeros(2, 3).to_sparse()), R, ["logprobs is a sparse"]),
    ("loss_logprobs_meta", lambda: loss_of(grpo(), torch.zeros(2, 3, device="meta")), R, ["meta device"]),
    ("loss_credit_of_other_rows", lambda: grpo().loss(torch.zeros(1, 3), rollout().select([0]), grpo().assign(
        rollout())), R, ["credit is for shape [2, 3]", "select the same rows"]),
    ("loss_totals_a_tuple", lambda: loss_of(grpo(), torch.zeros(2, 3), totals=(4, None)), R,
     ["totals must be a rlcredit.functional.Totals"]),
    ("loss_kl_without_ref", lambda: loss_of(rlcredit.build("grpo", policy_loss={"name": "clipped_surrogate",
                                                                                "kl_coef": 0.1}), torch.zeros(2, 3)),
     R, ["missing inputs", "rollout.ref_logprobs"]),
    ("entropy_forks_without_entropy", lambda: rlcredit.build("entropy_forks").assign(rollout()), R,
     ["missing inputs", "signals['entropy']", "HFPolicy(model)"]),
    ("stapo_without_old_logprobs", lambda: rlcredit.build("stapo").assign(rollout(
        signals={"entropy": torch.ones(2, 3)})), R, ["rollout.old_logprobs"]),
    ("loss_returning_a_float", lambda: loss_of(rlcredit.Strategy(policy_loss=Returns(0.5)), torch.zeros(2, 3)), R,
     ["must return a rlcredit.LossOutput", "float"]),
    ("estimator_wrong_shape", lambda: rlcredit.Strategy(estimators={"x": Returns(torch.zeros(2, 2))}).assign(
        rollout()), R, ["estimator 'x'", "[B, T] = [2, 3]", "shape [2, 2]"]),
    ("estimator_sparse_output", lambda: rlcredit.Strategy(estimators={"x": Returns(torch.zeros(2, 3).to_sparse())})
     .assign(rollout()), R, ["estimator 'x'", "sparse"]),
    ("weighter_negative_output", lambda: rlcredit.Strategy(weighter=Returns(-torch.ones(2, 3))).assign(rollout()), R,
     ["token_weights holds 3 negative", "from the weighter Returns"]),
    ("weighter_nan_output", lambda: rlcredit.Strategy(weighter=Returns(torch.full((2, 3), NAN))).assign(rollout()), R,
     ["token_weights", "non-finite"]),
    ("shaper_wrong_shape", lambda: rlcredit.Strategy(shapers=[Returns(torch.zeros(2, 4))]).assign(rollout()), R,
     ["shaper Returns must return real [B] or [B, T]"]),
    ("shaper_inf_output", lambda: rlcredit.Strategy(shapers=[Returns(torch.tensor([INF, 0.0]))]).assign(rollout()),
     R, ["advantages contains 1 non-finite", "shapers ['Returns']"]),
    ("loss_called_directly_without_rollout", lambda: ClippedSurrogate()(torch.zeros(2, 3), None, credit()), R,
     ["rollout must be a rlcredit.Rollout"]),
    # --- functional kernels
    ("aggregate_negative_weight", lambda: F.aggregate(torch.ones(2, 3), MASK, torch.tensor([[1.0, -1.0, 0.0]] * 2)),
     E, ["`weights` on valid tokens holds 1 negative value(s)", "[0, 1e+20]"]),
    ("aggregate_nan_weight", lambda: F.aggregate(torch.ones(2, 3), MASK, torch.full((2, 3), NAN)), E,
     ["3 NaN value(s)"]),
    ("aggregate_unknown_mode", lambda: F.aggregate(torch.ones(2, 3), MASK, mode="sum"), E,
     ["unknown aggregation mode 'sum'", "token_mean"]),
    ("aggregate_float_mask", lambda: F.aggregate(torch.ones(2, 3), MASK.float()), R, ["bool tensor", ".bool()"]),
    ("aggregate_totals_inf", lambda: F.aggregate(torch.ones(2, 3), MASK, totals=F.Totals(tokens=INF)), E,
     ["totals.tokens", "finite"]),
    ("aggregate_totals_negative_tensor", lambda: F.aggregate(torch.ones(2, 3), MASK,
                                                             totals=F.Totals(tokens=torch.tensor(-1.0))), E,
     ["totals.tokens", ">= 0"]),
    ("aggregate_totals_world_0", lambda: F.aggregate(torch.ones(2, 3), MASK, totals=F.Totals(tokens=3, world=0)), E,
     ["totals.world", "int >= 1"]),
    ("group_normalize_eps_a_string", lambda: F.group_normalize(torch.ones(2), torch.zeros(2, dtype=torch.long),
                                                               eps="x"), E, ["`eps`", "got 'x' (str)"]),
    ("group_normalize_eps_1e300", lambda: F.group_normalize(torch.ones(2), torch.zeros(2, dtype=torch.long),
                                                            eps=1e300), E, ["`eps`", "float32's range"]),
    ("group_normalize_rewards_a_list", lambda: F.group_normalize([1.0, 0.0], torch.zeros(2, dtype=torch.long)), R,
     ["`rewards` must be a torch.Tensor", "torch.as_tensor"]),
    ("group_normalize_float_ids", lambda: F.group_normalize(torch.ones(2), torch.zeros(2)), R,
     ["`group_ids` must be an integer tensor"]),
    ("group_normalize_sparse_rewards", lambda: F.group_normalize(torch.ones(2).to_sparse(),
                                                                 torch.zeros(2, dtype=torch.long)), R, ["sparse"]),
    ("top_fraction_2", lambda: F.top_fraction_mask(torch.ones(2, 3), MASK, 2.0), E, ["`fraction`", "(0.0, 1.0]"]),
    ("top_fraction_unknown_scope", lambda: F.top_fraction_mask(torch.ones(2, 3), MASK, 0.5, "row"), E,
     ["unknown scope 'row'", "'sequence'"]),
    ("top_fraction_group_without_ids", lambda: F.top_fraction_mask(torch.ones(2, 3), MASK, 0.5, "group"), E,
     ["needs `group_ids`"]),
    ("overlong_cache_above_max", lambda: F.overlong_penalty(torch.tensor([3]), max_length=4, cache_length=8), E,
     ["cache_length", "<= `max_length`"]),
    ("clipped_surrogate_bad_advantages", lambda: F.clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3),
                                                                     torch.zeros(3)), R, ["`advantages`", "[B=2]"]),
    ("k3_kl_shape_mismatch", lambda: F.k3_kl(torch.zeros(2, 3), torch.zeros(3, 2)), R, ["`ref_logprobs`", "shape"]),
    ("dependency_scale_negative_beta", lambda: F.dependency_scale(torch.ones(2), torch.ones(2, dtype=torch.bool),
                                                                  beta_min=-1.0), E, ["`beta_min`"]),
    ("masked_mean_int_mask", lambda: F.masked_mean(torch.ones(2, 3), MASK.long()), R, ["`mask` must be a bool"]),
    ("loss_coefficients_reducer_a_string", lambda: F.loss_coefficients(MASK, reducer="all"), E,
     ["reducer must be None"]),
    # --- HFPolicy
    ("policy_of_none", lambda: rlcredit.HFPolicy(None), A, ["LM head", "NoneType"]),
    ("policy_of_a_backbone", lambda: rlcredit.HFPolicy(torch.nn.Linear(2, 2)), A, ["get_output_embeddings()"]),
    ("policy_ids_beyond_vocabulary", lambda: stats({"input_ids": torch.tensor([[1, 2, 16]])}), R,
     ["outside the model's vocabulary [0, 16)", "max 16"]),
    ("policy_negative_ids", lambda: stats({"input_ids": torch.tensor([[1, -1, 3]])}), R, ["outside", "min -1"]),
    ("policy_float_ids", lambda: stats({"input_ids": torch.zeros(1, 3)}), R, ["input_ids must be a dense integer"]),
    ("policy_temperature_0", lambda: stats({"input_ids": torch.ones(1, 3, dtype=torch.long)}, temperature=0.0), E,
     ["temperature", "(0.0, inf)"]),
    ("policy_temperature_nan", lambda: stats({"input_ids": torch.ones(1, 3, dtype=torch.long)}, temperature=NAN), E,
     ["temperature", "finite"]),
    ("policy_model_inputs_an_int", lambda: stats(5), R, ["model_inputs must be a mapping"]),
    ("policy_without_input_ids", lambda: stats({"pixel_values": torch.zeros(1)}), R, ["must contain 'input_ids'"]),
    ("policy_float_mask", lambda: stats({"input_ids": torch.ones(1, 3, dtype=torch.long)}, torch.ones(1, 2)), R,
     ["response_mask must be a [B, T] bool"]),
]


@pytest.mark.parametrize("call, error, fragments", [c[1:] for c in RAISES], ids=[c[0] for c in RAISES])
def test_bad_input_raises_a_clear_error(call, error, fragments):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, RLCreditError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --------------------------------------------------------------------------- finite, correct values


def _advantages(preset: str, rewards: torch.Tensor, groups: list[int] | None = None) -> torch.Tensor:
    B = rewards.shape[0]
    r = rlcredit.Rollout(torch.ones(B, 1, dtype=torch.bool), rewards,
                         torch.tensor(groups if groups is not None else [0] * B))
    return rlcredit.build(preset).assign(r).advantages


def _grad(dtype: torch.dtype, preset: str = "dapo") -> torch.Tensor:
    """The issue's worst case: one token, old log-prob -12, new 0, A < 0 (gradient e^12 = 162755)."""
    r = rlcredit.Rollout(torch.ones(1, 1, dtype=torch.bool), torch.tensor([0.0]), torch.tensor([0]),
                         old_logprobs=torch.full((1, 1), -12.0))
    logp = torch.zeros(1, 1, dtype=dtype, requires_grad=True)
    rlcredit.build(preset).loss(logp, r, credit(token_weights=torch.ones(1, 1), advantages=torch.tensor([-1.0])))\
        .loss.backward()
    return logp.grad


def _saturated_loss() -> tuple[torch.Tensor, torch.Tensor]:
    """A = -3e38 on one token with log-ratio 20: the exact loss 1.5e47 is beyond float32."""
    r = rlcredit.Rollout(torch.ones(1, 1, dtype=torch.bool), torch.tensor([0.0]), torch.tensor([0]),
                         old_logprobs=torch.full((1, 1), -25.0))
    logp = torch.full((1, 1), -5.0, requires_grad=True)
    out = rlcredit.build("grpo").loss(logp, r, credit(token_weights=torch.ones(1, 1),
                                                      advantages=torch.tensor([-3e38])))
    out.loss.backward()
    return out.loss.detach(), logp.grad


def _loss_value(preset: str, logp: torch.Tensor, r: rlcredit.Rollout, c: rlcredit.Credit | None = None,
                metric: str | None = None) -> torch.Tensor:
    s = rlcredit.build(preset)
    out = s.loss(logp, r, s.assign(r) if c is None else c)
    return out.metrics[metric] if metric else out.loss.detach()


def _kept_fraction_with_padding_weight() -> torch.Tensor:
    r = rlcredit.Rollout(MASK, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    return _loss_value("grpo", torch.zeros(2, 3), r, credit(token_weights=torch.ones(2, 3)), "kept_fraction")


def _json_spec_of_numpy_hyperparameters() -> str:
    s = rlcredit.Strategy(estimators={"e": "entropy"}, weighter=TopFraction(np.float32(0.25), score="e"),
                          policy_loss=ClippedSurrogate(clip_high=np.float64(0.28), aggregation="seq_mean_token_sum_norm",
                                                       max_length=np.int64(64)))
    assert type(s.weighter.fraction) is float and type(s.policy_loss.max_length) is int
    assert rlcredit.build(json.loads(json.dumps(s.to_spec()))) == s
    return json.dumps(s.to_spec()["weighter"], sort_keys=True)


def _select(rows: Any) -> torch.Tensor:
    r = rlcredit.Rollout(torch.ones(4, 1, dtype=torch.bool), torch.tensor([0.0, 1.0, 2.0, 3.0]),
                         torch.tensor([0, 0, 1, 1]))
    return r.select(rows).rewards


def _alias_keeps_the_first_name() -> bool:
    rlcredit.register("weighter", "_catalogue_uniform_alias", override=True)(Uniform)
    return rlcredit.build(grpo().to_spec()) == grpo() and grpo().to_spec()["weighter"] == "uniform"


def _override_undone_round_trips() -> bool:
    with_override("weighter", "uniform", lambda: None)
    return rlcredit.build(grpo().to_spec()) == grpo()


def _repr_of_unregistered() -> str:
    return repr(rlcredit.Strategy(weighter=Unregistered()))[:9]


def _empty_batch_loss() -> tuple[torch.Tensor, torch.Tensor]:
    r = rlcredit.Rollout(torch.zeros(2, 3, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    logp = torch.full((2, 3), NAN, requires_grad=True)  # padding may hold anything
    out = rlcredit.build("vppo").loss(logp, r, credit(token_weights=torch.zeros(2, 3)))
    out.loss.backward()
    return out.loss.detach(), logp.grad


def _no_response_tokens_loss() -> torch.Tensor:
    r = rlcredit.Rollout(torch.ones(2, 0, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    return _loss_value("dapo", torch.zeros(2, 0, requires_grad=True), r)


def _float64_logprobs_grad() -> torch.Tensor:
    r = rlcredit.Rollout(torch.ones(1, 1, dtype=torch.bool), torch.tensor([0.0]), torch.tensor([0]),
                         old_logprobs=torch.zeros(1, 1))
    logp = torch.zeros(1, 1, dtype=torch.float64, requires_grad=True)
    rlcredit.build("grpo").loss(logp, r, credit(token_weights=torch.ones(1, 1), advantages=torch.tensor([2.0])))\
        .loss.backward()
    return logp.grad


def _local_reducer_equals_none() -> bool:
    r = rlcredit.Rollout(MASK, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), old_logprobs=torch.zeros(2, 3))
    s = rlcredit.build("dr_grpo")
    a, b = s.assign(r), s.assign(r, reducer=LocalReducer())
    return torch.equal(a.advantages, b.advantages) and torch.equal(
        s.loss(torch.zeros(2, 3), r, a).loss, s.loss(torch.zeros(2, 3), r, b, reducer=LocalReducer()).loss)


def _soft_weights_scale_free() -> bool:
    r = rlcredit.Rollout(MASK, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    s = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    # Equal up to the 1e-6 that keeps a constant row finite (it does not scale with the scores).
    return torch.allclose(SoftWeight()({"x": s}, r), SoftWeight()({"x": s * 2.0**100}, r), atol=1e-6)


def _dependency_scale_scale_free() -> bool:
    r = rlcredit.Rollout(MASK, torch.tensor([1.0, -1.0]), torch.tensor([0, 0]))
    s = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    return torch.equal(DependencyScale()(adv, {"x": s}, r), DependencyScale()(adv, {"x": s * 2.0**120}, r))


def _kl_of_a_huge_gap() -> torch.Tensor:
    r = rlcredit.Rollout(torch.ones(1, 1, dtype=torch.bool), torch.tensor([0.0]), torch.tensor([0]),
                         ref_logprobs=torch.zeros(1, 1))
    s = rlcredit.build("grpo", policy_loss={"name": "clipped_surrogate", "kl_coef": 1.0})
    out = s.loss(torch.full((1, 1), -1e4), r, credit(token_weights=torch.ones(1, 1), advantages=torch.tensor([0.0])))
    return out.metrics["kl"]


E30 = 1e30
ROOT_HALF = 1 / math.sqrt(2)

VALUES: list[tuple[str, Callable[[], Any], Any]] = [
    # --- reward magnitudes: the statistics scale before squaring and summing
    ("grpo_rewards_1e20", lambda: _advantages("grpo", torch.tensor([1e20, -1e20])), [ROOT_HALF, -ROOT_HALF]),
    ("grpo_rewards_1e30", lambda: _advantages("grpo", torch.tensor([E30, 0.0])), [ROOT_HALF, -ROOT_HALF]),
    ("grpo_rewards_3e38", lambda: _advantages("grpo", torch.tensor([3e38, -3e38, 0.0])), [1.0, -1.0, 0.0]),
    ("grpo_float64_rewards_1e30", lambda: _advantages("grpo", torch.tensor([E30, -E30], dtype=torch.float64)),
     [ROOT_HALF, -ROOT_HALF]),
    ("grpo_tiny_spread", lambda: _advantages("grpo", torch.tensor([3e-30, 1e-30])), [0.0, 0.0]),
    ("dr_grpo_rewards_3e38", lambda: _advantages("dr_grpo", torch.tensor([3e38, -3e38])), [3e38, -3e38]),
    ("dr_grpo_metric_3e38", lambda: rlcredit.build("dr_grpo").assign(rlcredit.Rollout(
        torch.ones(2, 1, dtype=torch.bool), torch.tensor([3e38, -3e38]), torch.tensor([0, 0])))
     .metrics["advantage_abs_mean"], 3e38),
    ("leave_one_out_1e30", lambda: F.leave_one_out(torch.tensor([E30, -E30]), torch.tensor([0, 0])), [2e30, -2e30]),
    ("group_center_mixed_groups", lambda: F.group_center(torch.tensor([E30, 0.0, 2.0, 4.0]), torch.tensor([0, 0, 1, 1])),
     [5e29, -5e29, -1.0, 1.0]),
    ("masked_mean_of_3e38", lambda: F.masked_mean(torch.full((1, 4), 3e38), torch.ones(1, 4, dtype=torch.bool)),
     [3e38]),
    ("soft_weights_scale_free", _soft_weights_scale_free, True),
    ("dependency_scale_scale_free", _dependency_scale_scale_free, True),
    # --- half precision: float32 maths, gradients that fit the input dtype
    ("fp16_gradient_saturates", lambda: _grad(torch.float16), [[65504.0]]),
    ("bf16_gradient_exact", lambda: _grad(torch.bfloat16), [[torch.tensor(math.exp(12)).bfloat16().item()]]),
    ("fp32_gradient_exact", lambda: _grad(torch.float32), [[math.exp(12)]]),
    # under the dual clip only the entropy term pushes: -0.06, rounded to float16
    ("fp16_gradient_under_dual_clip", lambda: _grad(torch.float16, "vppo"), [[torch.tensor(-0.06).half().item()]]),
    ("float64_logprobs_gradient", _float64_logprobs_grad, [[-2.0]]),
    ("loss_beyond_float32_saturates", lambda: _saturated_loss()[0], F32_MAX),
    ("gradient_beyond_float32_saturates", lambda: _saturated_loss()[1], [[F32_MAX]]),
    # --- extreme log-probs: ratios clamp at e^+-20
    ("logprobs_-1e4_dapo", lambda: _loss_value("dapo", torch.full((1, 1), -1e4), rlcredit.Rollout(
        torch.ones(1, 1, dtype=torch.bool), torch.tensor([0.0]), torch.tensor([0]), old_logprobs=torch.zeros(1, 1)),
        credit(token_weights=torch.ones(1, 1), advantages=torch.tensor([-1.0]))), 0.8),
    ("neg_logprob_metric_-1e4", lambda: _loss_value("vppo", torch.full((1, 1), -1e4), rlcredit.Rollout(
        torch.ones(1, 1, dtype=torch.bool), torch.tensor([0.0]), torch.tensor([0]), old_logprobs=torch.full((1, 1),
                                                                                                            -1e4)),
        credit(token_weights=torch.ones(1, 1), advantages=torch.tensor([0.0])), "neg_logprob"), 1e4),
    ("kl_of_a_1e4_gap", _kl_of_a_huge_gap, math.exp(20) - 21),  # k3 at the clamp d = 20
    ("gspo_log_ratio_1e4", lambda: GSPO()(torch.zeros(1, 2), rlcredit.Rollout(
        torch.ones(1, 2, dtype=torch.bool), torch.tensor([0.0]), torch.tensor([0]), old_logprobs=torch.full((1, 2),
                                                                                                         -1e4)),
        credit(token_weights=torch.ones(1, 2), advantages=torch.tensor([1.0]))).loss, -(1 + 4e-4)),
    # --- degenerate batches
    ("all_padding_batch", lambda: torch.stack([_empty_batch_loss()[0], _empty_batch_loss()[1].abs().sum()]),
     [0.0, 0.0]),
    ("no_response_tokens", _no_response_tokens_loss, 0.0),
    ("one_sample_group", lambda: _advantages("grpo", torch.tensor([5.0, 1.0, 0.0]), [0, 1, 1]),
     [0.0, ROOT_HALF, -ROOT_HALF]),
    ("all_equal_group", lambda: _advantages("grpo", torch.tensor([0.1, 0.1, 0.1])), [0.0, 0.0, 0.0]),
    ("int_and_bool_rewards", lambda: torch.cat([_advantages("dr_grpo", torch.tensor([1, 0])),
                                                _advantages("dr_grpo", torch.tensor([True, False]))]),
     [0.5, -0.5, 0.5, -0.5]),
    ("kept_fraction_ignores_padding_weight", _kept_fraction_with_padding_weight, 1.0),
    ("aggregate_ignores_negative_padding_weight", lambda: F.aggregate(torch.ones(2, 3), MASK,
                                                                      torch.tensor([[1.0, 1.0, -9.0], [1.0, -9.0, NAN]])),
     1.0),
    # --- row selection: the one rule
    ("select_list_of_bools_is_a_mask", lambda: _select([True, False, True, False]), [0.0, 2.0]),
    ("select_numpy_int_indices", lambda: _select(np.array([3, 1])), [3.0, 1.0]),
    ("select_numpy_bool_mask", lambda: _select(np.array([False, True, False, True])), [1.0, 3.0]),
    ("select_numpy_int_scalars", lambda: _select([np.int64(2)]), [2.0]),
    ("select_repeated_rows", lambda: _select([1, 1]), [1.0, 1.0]),
    ("select_slice", lambda: _select(slice(1, None, 2)), [1.0, 3.0]),
    ("select_range", lambda: _select(range(2, 4)), [2.0, 3.0]),
    ("select_bool_tensor", lambda: _select(torch.tensor([True, True, False, False])), [0.0, 1.0]),
    ("credit_select_matches_rollout", lambda: credit(advantages=torch.tensor([1.0, -1.0])).select([False, True])
     .advantages, [-1.0]),
    # --- hyper-parameters from NumPy
    ("numpy_hyperparameters_json", _json_spec_of_numpy_hyperparameters,
     json.dumps({"name": "top_fraction", "fraction": 0.25, "score": "e"}, sort_keys=True)),
    ("numpy_float32_equals_python", lambda: TopFraction(np.float32(0.5)) == TopFraction(0.5), True),
    ("numpy_int_scope", lambda: component_spec(DependencyScale(scope=np.int64(16))), {"name": "dependency_scale",
                                                                                    "scope": 16}),
    # --- registry semantics
    ("alias_keeps_the_first_name", _alias_keeps_the_first_name, True),
    ("override_undone_round_trips", _override_undone_round_trips, True),
    ("repr_never_raises", _repr_of_unregistered, "Strategy("),
    ("local_reducer_equals_none", _local_reducer_equals_none, True),
]


@pytest.mark.parametrize("call, expected", [c[1:] for c in VALUES], ids=[c[0] for c in VALUES])
def test_edge_input_gives_a_finite_correct_value(call, expected):
    value = call()
    if isinstance(value, torch.Tensor):
        assert torch.isfinite(value.float()).all(), value
        assert torch.allclose(value.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6), value
    elif isinstance(expected, float):
        assert value == pytest.approx(expected, rel=1e-5)
    else:
        assert value == expected


def test_the_catalogue_is_broad():
    assert len(RAISES) + len(VALUES) >= 120
    assert len({c[0] for c in RAISES + VALUES}) == len(RAISES) + len(VALUES)  # ids are unique
