"""The documentation site builds strictly and covers the public API.

``mkdocs build --strict`` turns every warning into an error: a broken link or anchor, a page missing
from the nav, a mkdocstrings reference to an object that does not exist. The build needs no network.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# DESIGN.md §8: the public names other code, docs and checks rely on. Each must appear in docs/.
PUBLIC_NAMES = [
    *(f"rlcredit.{n}" for n in (
        "Rollout", "Credit", "LossOutput", "EstimatorOutput", "Strategy", "HFPolicy",
        "build", "register", "get", "available",
        "RLCreditError", "RolloutError", "RegistryError", "SpecError", "AdapterError",
    )),
    *(f"rlcredit.functional.{n}" for n in (
        "token_kl", "fused_token_kl", "token_entropy", "group_normalize", "top_fraction_mask",
    )),
    *(f"rlcredit_mm.{n}" for n in ("VisualKL", "AttentionConnectivity", "AnchorClusters")),
    "rlcredit demo", "rlcredit inspect",
]

# DESIGN.md §8: registered names, each written as `name` somewhere in docs/.
REGISTERED_NAMES = [
    "uniform", "signal", "entropy", "visual_kl", "attention_connectivity",                   # estimators
    "top_fraction", "threshold", "intersect", "union", "complement", "anchor_clusters",      # weighters
    "group_normalize", "group_center", "leave_one_out", "dependency_scale",                  # shapers
    "clipped_surrogate",                                                                     # losses
    "patch_blackout", "gaussian_noise", "constant", "blur", "drop",                          # perturbations
    "grpo", "dapo", "dr_grpo", "entropy_forks", "vppo", "vppo_paper", "at_rl",               # presets
    "soft", "stapo", "gspo",                                                                 # beyond §8
]

# The API reference (mkdocstrings) renders one anchor per documented object: each public name
# must have one, under the module that defines it.
API_ANCHORS = [
    *(f"rlcredit.{n}" for n in ("Rollout", "Credit", "LossOutput", "EstimatorOutput", "Strategy", "HFPolicy")),
    *(f"rlcredit.registry.{n}" for n in ("register", "get", "available")),
    "rlcredit.specs.build",
    *(f"rlcredit.errors.{n}" for n in ("RLCreditError", "RolloutError", "RegistryError", "SpecError", "AdapterError")),
    *(f"rlcredit.functional.{n}" for n in (
        "token_kl", "fused_token_kl", "token_entropy", "group_normalize", "top_fraction_mask",
    )),
    "rlcredit_mm.visual_kl.VisualKL",
    "rlcredit_mm.connectivity.AttentionConnectivity",
    "rlcredit_mm.anchors.AnchorClusters",
]


def _nav_pages(nav: object) -> list[str]:
    """Every page path in a mkdocs ``nav`` (nested lists of {title: path-or-list})."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


def _load_mkdocs_yml() -> dict:
    import yaml  # PyYAML: in the dev extra, and a dependency of mkdocs

    class Loader(yaml.SafeLoader):
        pass

    # mkdocs.yml uses `!!python/name:` tags (pymdownx fences); their values do not matter here.
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)


def _docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(DOCS.rglob("*.md")))


def test_nav_pages_exist():
    config = _load_mkdocs_yml()
    pages = _nav_pages(config["nav"])
    assert pages, "mkdocs.yml has an empty nav"
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"pages listed in mkdocs.yml nav but missing from docs/: {missing}"


def test_public_names_are_documented():
    text = _docs_text()
    missing = [name for name in PUBLIC_NAMES if name not in text]
    assert not missing, f"public names (DESIGN.md §8) never mentioned in docs/: {missing}"
    missing = [name for name in REGISTERED_NAMES if f"`{name}`" not in text]
    assert not missing, f"registered names (DESIGN.md §8) never written as `name` in docs/: {missing}"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install 'rlcredit[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr}\n{proc.stdout}"
    api = "\n".join(p.read_text(encoding="utf-8") for p in sorted((tmp_path / "site" / "api").rglob("*.html")))
    missing = [name for name in API_ANCHORS if f'id="{name}"' not in api]
    assert not missing, f"the API reference has no entry for: {missing}"
