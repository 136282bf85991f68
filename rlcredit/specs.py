"""Whole strategies from data: ``rlcredit.build`` of a preset name, a spec dict or a spec file.

This module sits above ``rlcredit.strategy`` (it builds ``Strategy`` objects), while the registry
of components sits below every component: no import cycle. Configs are data: JSON, YAML
(``safe_load``) or TOML, never ``eval``, pickle or a dotted import path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from rlcredit.errors import RegistryError, SpecError
from rlcredit.registry import available, get
from rlcredit.strategy import Strategy

__all__ = ["build", "load_spec_file", "STRATEGY_KEYS", "SPEC_SUFFIXES"]

STRATEGY_KEYS = ("estimators", "weighter", "shapers", "policy_loss")
"""The keys of a strategy spec dict (besides ``preset``), and the overrides ``build`` accepts."""

SPEC_SUFFIXES = (".json", ".yaml", ".yml", ".toml")
"""The file extensions of spec files."""


def load_spec_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a strategy spec from a ``.json``, ``.yaml``/``.yml`` or ``.toml`` file (data only).

    Raises:
        SpecError: the path is missing, a folder, not UTF-8, of an unknown extension, does not
            parse, or does not hold a mapping (each said as such).

    Examples:
        >>> import json, tempfile, pathlib
        >>> from rlcredit.specs import load_spec_file
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "s.json"
        >>> _ = path.write_text(json.dumps({"preset": "dapo", "shapers": ["group_center"]}))
        >>> load_spec_file(path)
        {'preset': 'dapo', 'shapers': ['group_center']}
    """
    p = Path(path)
    if p.is_dir():
        raise SpecError(f"spec path {str(p)!r} is a folder, not a spec file; pass a .json, .yaml, .yml or .toml file.")
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} does not exist (relative to {os.getcwd()!r}).")
    suffix = p.suffix.lower()
    if suffix not in SPEC_SUFFIXES:
        raise SpecError(f"spec file {str(p)!r}: unknown extension {suffix!r}; use .json, .yaml, .yml or .toml.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"spec file {str(p)!r} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8.") \
            from None
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            try:
                import yaml
            except ImportError as err:
                raise SpecError("reading YAML specs needs PyYAML: pip install 'rlcredit[yaml]'.") from err
            data = yaml.safe_load(text)  # safe_load: configs are data, never objects
    except SpecError:
        raise
    except Exception as err:  # every parser has its own error type: all mean "does not parse"
        raise SpecError(f"spec file {str(p)!r} could not be parsed: {err}") from err
    if not isinstance(data, Mapping):
        raise SpecError(f"spec file {str(p)!r} must hold a mapping (a strategy spec), got {type(data).__name__}.")
    return dict(data)


def _from_string(spec: str) -> Strategy | dict[str, Any]:
    """A preset (built) or a spec file (read): whichever the string names, with an error that says which it tried."""
    if not spec.strip():
        raise SpecError(
            f"build({spec!r}): an empty string names neither a preset nor a spec file; presets: "
            f"{', '.join(available('strategy'))}."
        )
    if spec in available("strategy"):
        return _call_preset(spec)
    path = Path(spec)
    if path.exists() or path.suffix.lower() in SPEC_SUFFIXES or os.sep in spec or "/" in spec:
        return load_spec_file(path)
    try:
        get("strategy", spec)
    except RegistryError as err:
        raise RegistryError(
            f"{err} A string spec is a preset name or the path of an existing spec file (.json, .yaml, .yml, .toml). "
            f"No file {spec!r} exists either."
        ) from None
    return _call_preset(spec)


def build(spec: Any, **overrides: Any) -> Strategy:
    """Build a ``rlcredit.Strategy`` from a preset name, a spec dict, or a spec file.

    Args:
        spec: a registered preset name (``"grpo"``, ``"vppo"``...); else a path to a JSON, YAML or
            TOML file; or a dict with keys ``estimators`` (name -> estimator spec), ``weighter``,
            ``shapers`` (list), ``policy_loss``, and optionally ``preset`` (a preset to patch).
            Parts left out default to GRPO: no estimators, ``uniform`` weighter,
            ``[group_normalize]`` shapers, ``clipped_surrogate`` loss. A ``Strategy`` is returned
            as it is (with overrides applied).
        **overrides: replace whole parts of the result, e.g.
            ``weighter={"name": "top_fraction", "fraction": 0.2}``.

    Returns:
        The ``rlcredit.Strategy``.

    Raises:
        RegistryError: an unknown preset or component name.
        SpecError: an unknown key or parameter, a missing parameter, or an unreadable file.

    Examples:
        >>> import rlcredit
        >>> s = rlcredit.build("dapo")
        >>> s.policy_loss.clip_high
        0.28
        >>> rlcredit.build(s.to_spec()) == s
        True
        >>> rlcredit.build("grpo", policy_loss={"name": "clipped_surrogate", "clip_high": 0.3}).policy_loss.clip_high
        0.3
    """
    bad = sorted(set(overrides) - set(STRATEGY_KEYS))
    if bad:
        raise SpecError(f"build(): unknown override(s) {', '.join(map(repr, bad))}; accepted: {', '.join(STRATEGY_KEYS)}.")
    if isinstance(spec, os.PathLike):
        spec = load_spec_file(spec)
    elif isinstance(spec, str):
        spec = _from_string(spec)
    if isinstance(spec, Strategy):
        base = spec
    elif isinstance(spec, Mapping):
        data = dict(spec)
        preset = data.pop("preset", None)
        unknown = sorted(set(data) - set(STRATEGY_KEYS), key=str)
        if unknown:
            raise SpecError(
                f"strategy spec has unknown key(s) {', '.join(map(repr, unknown))}; accepted: "
                f"{', '.join(('preset',) + STRATEGY_KEYS)}."
            )
        if preset is not None:
            if not isinstance(preset, str):
                raise SpecError(f"strategy spec: 'preset' names a registered preset (a string), got {preset!r}.")
            return build(preset, **{**data, **overrides})
        base = Strategy(**data)
    else:
        raise SpecError(
            f"build() takes a preset name, a spec dict, a spec file path or a Strategy; got {type(spec).__name__}."
        )
    return attrs.evolve(base, **overrides) if overrides else base


def _call_preset(name: str) -> Strategy:
    strategy = get("strategy", name)()
    if not isinstance(strategy, Strategy):
        raise RegistryError(f"preset {name!r} returned {type(strategy).__name__}, expected a rlcredit.Strategy.")
    return strategy
