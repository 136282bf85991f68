"""Registry, specs, config files and entry-point plugins."""

import json
import sys
import textwrap
import warnings

import attrs
import pytest
import torch

import rlcredit
from rlcredit import RegistryError, SpecError, registry
from rlcredit.losses import ClippedSurrogate
from rlcredit.shapers import GroupCenter, GroupNormalize


def test_available_lists_every_kind():
    listing = rlcredit.available()
    assert set(listing) == set(registry.KINDS)
    assert {"uniform", "signal", "entropy"} <= set(listing["estimator"])
    assert {"group_normalize", "group_center", "leave_one_out"} <= set(listing["shaper"])
    assert "clipped_surrogate" in listing["loss"]
    assert {"grpo", "dapo", "dr_grpo"} <= set(listing["strategy"])
    assert rlcredit.available("shaper") == sorted(listing["shaper"])


def test_unknown_names_list_available_and_suggest():
    with pytest.raises(RegistryError) as err:
        rlcredit.get("shaper", "group_normalise")
    msg = str(err.value)
    assert "did you mean 'group_normalize'?" in msg and "leave_one_out" in msg
    with pytest.raises(RegistryError, match="unknown kind 'shapers'"):
        rlcredit.get("shapers", "group_normalize")
    with pytest.raises(RegistryError, match="did you mean 'grpo'"):
        rlcredit.build("grp")


def test_register_duplicate_raises_unless_override():
    @attrs.frozen
    class A:
        requires = ()

    rlcredit.register("shaper", "_test_dup")(A)
    with pytest.raises(RegistryError, match="already registered"):
        rlcredit.register("shaper", "_test_dup")(attrs.frozen(type("B", (), {"requires": ()})))
    B = attrs.frozen(type("B", (), {"requires": ()}))
    rlcredit.register("shaper", "_test_dup", override=True)(B)
    assert rlcredit.get("shaper", "_test_dup") is B


def test_build_component_params_and_errors():
    assert registry.build_component("shaper", "group_center") == GroupCenter()
    assert registry.build_component("shaper", {"name": "group_normalize", "eps": 1e-4}) == GroupNormalize(eps=1e-4)
    with pytest.raises(SpecError) as err:
        registry.build_component("shaper", {"name": "group_normalize", "epsilon": 1e-4})
    assert "'epsilon'" in str(err.value) and "accepted: eps, unbiased" in str(err.value)
    with pytest.raises(SpecError, match="needs a 'name' key"):
        registry.build_component("shaper", {"eps": 1e-4})
    with pytest.raises(SpecError, match="clip_low must be a number in"):
        registry.build_component("loss", {"name": "clipped_surrogate", "clip_low": -0.1})
    with pytest.raises(SpecError, match="aggregation must be one of"):
        registry.build_component("loss", {"name": "clipped_surrogate", "aggregation": "mean"})
    with pytest.raises(SpecError, match="expected a shaper"):
        registry.build_component("shaper", 3)


def test_configs_are_data_not_code():
    for name in ("__import__('os')", "os.system", "rlcredit.shapers.GroupNormalize"):
        with pytest.raises(RegistryError):
            registry.build_component("shaper", name)


def test_build_presets_dicts_and_overrides():
    grpo = rlcredit.build("grpo")
    assert grpo == rlcredit.Strategy()
    assert grpo == rlcredit.build({})
    dr = rlcredit.build("dr_grpo")
    assert dr.shapers == (GroupCenter(),) and dr.policy_loss.aggregation == "seq_mean_token_sum_norm"
    patched = rlcredit.build("dapo", shapers=["group_center"])
    assert patched.shapers == (GroupCenter(),) and patched.policy_loss.clip_high == 0.28
    via_dict = rlcredit.build({"preset": "dapo", "shapers": ["group_center"]})
    assert via_dict == patched
    with pytest.raises(SpecError, match="unknown override"):
        rlcredit.build("grpo", weigher="uniform")
    with pytest.raises(SpecError, match="unknown key"):
        rlcredit.build({"weigher": "uniform"})
    with pytest.raises(SpecError, match="takes a preset name"):
        rlcredit.build(42)


def test_spec_round_trip_and_repr():
    s = rlcredit.Strategy(
        estimators={"entropy": {"name": "entropy", "temperature": 0.7}},
        shapers=["leave_one_out", {"name": "group_normalize", "unbiased": False}],
        policy_loss=ClippedSurrogate(clip_high=0.28, dual_clip=3.0, aggregation="seq_mean_token_mean"),
    )
    spec = s.to_spec()
    assert spec == {
        "estimators": {"entropy": {"name": "entropy", "temperature": 0.7}},
        "weighter": "uniform",
        "shapers": ["leave_one_out", {"name": "group_normalize", "unbiased": False}],
        "policy_loss": {"name": "clipped_surrogate", "clip_high": 0.28, "dual_clip": 3.0,
                        "aggregation": "seq_mean_token_mean"},
    }
    assert rlcredit.build(json.loads(json.dumps(spec))) == s
    assert repr(s).startswith("rlcredit.build({") and "leave_one_out" in repr(s)


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_build_from_files(tmp_path, suffix):
    path = tmp_path / f"strategy{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"preset": "dapo", "shapers": ["group_center"]}))
    elif suffix == ".yaml":
        path.write_text("preset: dapo\nshapers:\n  - group_center\n")
    else:
        path.write_text('preset = "dapo"\nshapers = ["group_center"]\n')
    assert rlcredit.build(str(path)) == rlcredit.build("dapo", shapers=["group_center"])
    assert rlcredit.build(path) == rlcredit.build("dapo", shapers=["group_center"])


def test_bad_files(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("preset: [unclosed\n")
    with pytest.raises(SpecError, match="could not be parsed"):
        rlcredit.build(str(bad))
    obj = tmp_path / "s.yml"
    obj.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="could not be parsed"):
        rlcredit.build(str(obj))
    lst = tmp_path / "s.json"
    lst.write_text("[1, 2]")
    with pytest.raises(SpecError, match="must hold a mapping"):
        rlcredit.build(str(lst))
    other = tmp_path / "s.ini"
    other.write_text("x")
    with pytest.raises(SpecError, match="unknown extension"):
        rlcredit.build(str(other))
    with pytest.raises(SpecError, match="spec file .*missing.yaml' does not exist"):
        rlcredit.build(str(tmp_path / "missing.yaml"))
    with pytest.raises(RegistryError, match="path of an existing spec file"):
        rlcredit.build("no_such_preset")
    with pytest.raises(SpecError, match="is a folder, not a spec file"):
        rlcredit.build(str(tmp_path))
    with pytest.raises(SpecError, match="empty string names neither a preset nor a spec file"):
        rlcredit.build("")


def _make_dist(site, dist, module, body, entry="rlcredit.plugins"):
    (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{entry}]\n{dist} = {module}\n")


def test_entry_point_plugins_register_and_broken_ones_are_reported(tmp_path, monkeypatch):
    _make_dist(tmp_path, "rlc_good_plugin", "rlc_good_plugin_mod", """
        import attrs, rlcredit
        @rlcredit.register("shaper", "plugin_negate", override=True)
        @attrs.frozen
        class Negate:
            requires = ()
            def __call__(self, advantages, scores, rollout, *, reducer=None):
                return -advantages
    """)
    _make_dist(tmp_path, "rlc_bad_plugin", "rlc_bad_plugin_mod", "raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cls = rlcredit.get("shaper", "plugin_negate")  # a lookup miss loads the plugins
    assert any("rlc_bad_plugin" in str(w.message) and "boom" in str(w.message) for w in caught)
    assert "rlc_bad_plugin" in registry.plugin_errors()
    s = rlcredit.build({"shapers": ["group_normalize", "plugin_negate"]})
    r = rlcredit.Rollout(torch.ones(2, 1, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    assert torch.allclose(s.assign(r).advantages, torch.tensor([-0.7071, 0.7071]), atol=1e-4)
    assert cls.__name__ == "Negate"
    with pytest.raises(RegistryError, match="failed to load: rlc_bad_plugin"):
        rlcredit.get("shaper", "no_such_shaper_anywhere")
    sys.modules.pop("rlc_good_plugin_mod", None)
    registry._PLUGIN_ERRORS.pop("rlc_bad_plugin", None)


def test_did_you_mean_prefers_the_fewest_edits():
    with pytest.raises(RegistryError, match="did you mean 'grpo'"):
        rlcredit.build("gpro")  # a swap of two letters, not 'gtpo' (one substitution, but difflib ties them)
    with pytest.raises(RegistryError, match="did you mean 'entropy_forks'"):
        rlcredit.build("entropy_fork")
