"""Every numeric hyper-parameter of every registered component: finite, float32-sized, NumPy-friendly.

Issue #14 item 5. For each registered estimator, weighter, shaper, loss and perturbation (plugins
and components added later included), each field whose default is a number is checked from the
outside: ``inf``/``NaN`` and values beyond float32's range raise ``SpecError`` at construction,
from Python and from a JSON spec alike, and a NumPy scalar is accepted and stored as the equal
Python number, so that ``to_spec()`` stays JSON-serialisable and rebuilds an equal component.
"""

from __future__ import annotations

import json
import math
import numbers

import attrs
import numpy as np
import pytest

import rlcredit
from rlcredit import RLCreditError, SpecError
from rlcredit.registry import SPEC_KINDS, build_component, component_spec

# Parameters without defaults that a spec must give (the rest of each class builds from defaults).
REQUIRED = {
    ("weighter", "top_fraction"): {"fraction": 0.5},
    ("weighter", "threshold"): {"value": 0.5},
    ("weighter", "intersect"): {"parts": ["uniform"]},
    ("weighter", "union"): {"parts": ["uniform"]},
    ("weighter", "complement"): {"part": "uniform"},
    ("estimator", "signal"): {"key": "x"},
    ("estimator", "token_match"): {"ids": [1]},
}
KNOWN = {("weighter", "soft"), ("weighter", "stapo"), ("shaper", "group_normalize"),
         ("shaper", "dependency_scale"), ("loss", "clipped_surrogate"), ("loss", "gspo"), ("estimator", "entropy"),
         ("estimator", "visual_kl"), ("weighter", "anchor_clusters"), ("perturbation", "gaussian_noise")}


def _numeric_fields() -> list[tuple[str, str, str, object]]:
    """``(kind, name, field alias, default)`` for every init field with a (non-bool) numeric default."""
    rows = []
    for kind in SPEC_KINDS:
        for name in rlcredit.available(kind):
            cls = rlcredit.get(kind, name)
            for a in attrs.fields(cls):
                default = a.default
                if a.init and isinstance(default, numbers.Real) and not isinstance(default, bool):
                    rows.append((kind, name, a.alias, default))
    return rows


FIELDS = _numeric_fields()


def _build(kind: str, name: str, **params: object) -> object:
    return build_component(kind, {"name": name, **REQUIRED.get((kind, name), {}), **params})


def test_the_survey_covers_the_built_ins():
    assert KNOWN <= {(kind, name) for kind, name, _, _ in FIELDS}
    assert len(FIELDS) >= 25


@pytest.mark.parametrize("kind, name, field, default", FIELDS, ids=[f"{k}.{n}.{f}" for k, n, f, _ in FIELDS])
def test_numeric_hyperparameter(kind, name, field, default):
    is_int = isinstance(default, numbers.Integral)
    # A NumPy scalar is stored as the Python number it equals; the spec is plain JSON and round-trips.
    numpy_value = np.int64(default) if is_int else np.float32(default)
    obj = _build(kind, name, **{field: numpy_value})
    stored = getattr(obj, attrs.fields_dict(type(obj))[field].name if field in attrs.fields_dict(type(obj))
                     else next(a.name for a in attrs.fields(type(obj)) if a.alias == field))
    assert type(stored) is (int if is_int else float) and stored == numpy_value
    spec = json.loads(json.dumps(component_spec(obj)))
    assert build_component(kind, spec) == obj
    # Not an int / not finite or beyond what float32 holds: refused where it is written, Python or JSON.
    bad = [1.5, math.inf] if is_int else [math.inf, -math.inf, math.nan, 1e300]
    for value in bad:
        with pytest.raises(SpecError, match=field):
            _build(kind, name, **{field: value})
    if not is_int:
        with pytest.raises(RLCreditError, match=field):
            build_component(kind, json.loads(json.dumps({"name": name, **REQUIRED.get((kind, name), {}),
                                                         field: math.inf})))
