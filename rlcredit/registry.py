"""Registry of components by ``(kind, name)``, spec parsing, and entry-point plugins.

Classes (and preset factories) are registered, never instances. Library code imports classes
directly; only configs go through names. Configs are data: no ``eval``, no pickle, no import of a
dotted path named in a config.
"""

from __future__ import annotations

import difflib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from importlib import import_module, metadata
from pathlib import Path
from typing import Any, TypeVar

import attrs

from rlcredit.errors import RegistryError, RLCreditError, SpecError

__all__ = ["KINDS", "register", "get", "available", "build", "build_component", "component_spec",
           "load_plugins", "plugin_errors", "load_spec_file"]

KINDS: tuple[str, ...] = ("estimator", "weighter", "shaper", "loss", "perturbation", "adapter", "strategy")
PLUGIN_GROUP = "rlcredit.plugins"

_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_NAMES: dict[Any, tuple[str, str]] = {}
_PLUGINS_LOADED = False
_PLUGIN_ERRORS: dict[str, str] = {}

T = TypeVar("T")


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise RegistryError(f"unknown kind {kind!r}; the kinds are {', '.join(KINDS)}.")


def register(kind: str, name: str, *, override: bool = False) -> Callable[[T], T]:
    """Register a component class (or a preset factory for kind ``"strategy"``) under ``name``.

    Args:
        kind: one of ``"estimator"``, ``"weighter"``, ``"shaper"``, ``"loss"``, ``"perturbation"``,
            ``"adapter"``, ``"strategy"``.
        name: the name configs use (``snake_case``).
        override: replace an existing registration instead of raising.

    Returns:
        A decorator that registers its argument and returns it unchanged.

    Raises:
        RegistryError: the kind is unknown, or the name is taken and ``override`` is False.

    Examples:
        >>> import attrs, torch, rlcredit
        >>> @rlcredit.register("estimator", "doc_length", override=True)
        ... @attrs.frozen
        ... class Length:
        ...     requires = ()
        ...     def __call__(self, rollout, policy=None):
        ...         return rollout.response_mask.float().cumsum(-1) * rollout.response_mask
        >>> "doc_length" in rlcredit.available("estimator")
        True
    """
    _check_kind(kind)
    if not isinstance(name, str) or not name:
        raise RegistryError(f"register: name must be a non-empty string, got {name!r}.")

    def decorator(obj: T) -> T:
        table = _REGISTRY[kind]
        if name in table and table[name] is not obj and not override:
            raise RegistryError(
                f"{kind} {name!r} is already registered (by {_qualname(table[name])}); pick another name "
                f"or pass override=True to replace it."
            )
        table[name] = obj
        _NAMES[obj] = (kind, name)
        return obj

    return decorator


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _unknown(kind: str, name: str) -> RegistryError:
    names = sorted(_REGISTRY[kind])
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" did you mean {close[0]!r}?" if close else ""
    extra = ""
    if _PLUGIN_ERRORS:
        extra = " Plugins that failed to load: " + "; ".join(f"{k}: {v}" for k, v in _PLUGIN_ERRORS.items()) + "."
    return RegistryError(
        f"unknown {kind} {name!r};{hint} available {kind} names: {', '.join(names) or '(none)'}. "
        f"Register your own with @rlcredit.register({kind!r}, NAME).{extra}"
    )


def get(kind: str, name: str) -> Any:
    """The class (or preset factory) registered as ``(kind, name)``.

    A miss loads the ``rlcredit.plugins`` entry points once and looks again, which is how
    ``get("estimator", "visual_kl")`` finds ``rlcredit_mm`` after a plain ``import rlcredit``.

    Raises:
        RegistryError: unknown kind or name; the message lists the available names and suggests
            the closest one.

    Examples:
        >>> import rlcredit
        >>> rlcredit.get("shaper", "group_normalize").__name__
        'GroupNormalize'
    """
    _check_kind(kind)
    if not isinstance(name, str):
        raise RegistryError(f"{kind} names are strings, got {name!r} ({type(name).__name__}).")
    if name not in _REGISTRY[kind]:
        load_plugins()
    if name not in _REGISTRY[kind]:
        raise _unknown(kind, name)
    return _REGISTRY[kind][name]


def available(kind: str | None = None) -> list[str] | dict[str, list[str]]:
    """Registered names: a sorted list for one kind, or a dict ``kind -> names`` for all kinds.

    Plugins are loaded first, so the listing is complete.

    Examples:
        >>> import rlcredit
        >>> "grpo" in rlcredit.available("strategy")
        True
        >>> sorted(rlcredit.available())[:3]
        ['adapter', 'estimator', 'loss']
    """
    load_plugins()
    if kind is None:
        return {k: sorted(v) for k, v in _REGISTRY.items()}
    _check_kind(kind)
    return sorted(_REGISTRY[kind])


def name_of(obj_or_cls: Any) -> tuple[str, str] | None:
    """``(kind, name)`` under which a class (or an instance's class) is registered, else None."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return _NAMES.get(cls)


# ---------------------------------------------------------------------------------------------
# Plugins


def load_plugins(*, reload: bool = False) -> dict[str, str]:
    """Import every module of the ``rlcredit.plugins`` entry-point group (once).

    A plugin registers its components on import. A plugin that fails to import is reported with a
    warning and recorded in ``plugin_errors``, never fatal.

    Returns:
        The failures so far, ``entry-point name -> error``.

    Examples:
        >>> import rlcredit
        >>> from rlcredit.registry import load_plugins
        >>> "rlcredit_mm" in load_plugins()  # our own multimodal plugin loads cleanly
        False
        >>> "visual_kl" in rlcredit.available("estimator")
        True
    """
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED and not reload:
        return dict(_PLUGIN_ERRORS)
    _PLUGINS_LOADED = True
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken plugin must not break rlcredit: report it instead
            _PLUGIN_ERRORS[ep.name] = f"{type(err).__name__}: {err}"
            warnings.warn(f"rlcredit plugin {ep.name!r} ({ep.value}) failed to load: {err}", stacklevel=2)
        else:
            _PLUGIN_ERRORS.pop(ep.name, None)
    return dict(_PLUGIN_ERRORS)


def plugin_errors() -> dict[str, str]:
    """Plugins that failed to load: ``entry-point name -> error message``.

    Examples:
        >>> from rlcredit.registry import plugin_errors
        >>> isinstance(plugin_errors(), dict)
        True
    """
    return dict(_PLUGIN_ERRORS)


# ---------------------------------------------------------------------------------------------
# Component specs


def _init_names(cls: type) -> dict[str, attrs.Attribute]:
    if not attrs.has(cls):
        return {}
    return {a.alias: a for a in attrs.fields(cls) if a.init}


def build_component(kind: str, spec: Any) -> Any:
    """Turn a component spec into an object of ``kind``.

    ``spec`` is a registered name, a dict ``{"name": NAME, **params}``, or already an object (then
    returned unchanged). Nested components (combinator parts, perturbations) are built by the
    receiving class's converters, so specs nest to any depth.

    Raises:
        SpecError: a malformed spec or an unknown parameter (the accepted ones are listed).
        RegistryError: an unknown name.

    Examples:
        >>> import rlcredit
        >>> from rlcredit.registry import build_component
        >>> build_component("shaper", {"name": "group_normalize", "eps": 1e-4})
        GroupNormalize(eps=0.0001, unbiased=True)
    """
    if isinstance(spec, str):
        return get(kind, spec)()
    if isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise SpecError(f"a {kind} spec dict needs a 'name' key naming a registered {kind}, got {dict(spec)!r}.")
        cls = get(kind, name)
        accepted = _init_names(cls)
        unknown = sorted(set(params) - set(accepted)) if accepted or attrs.has(cls) else []
        if unknown:
            raise SpecError(
                f"{kind} {name!r} got unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"accepted: {', '.join(accepted) or '(none)'}."
            )
        try:
            return cls(**params)
        except (TypeError, ValueError) as err:
            if isinstance(err, RLCreditError):
                raise
            raise SpecError(f"{kind} {name!r}: {err}") from err
    if spec is None or isinstance(spec, (int, float, bool, Sequence)):
        raise SpecError(f"expected a {kind}: a registered name, a {{'name': ...}} dict or an object; got {spec!r}.")
    return spec


def component_spec(obj: Any) -> Any:
    """The spec that rebuilds ``obj``: its registered name, or ``{"name": ..., **non-default params}``.

    Nested components become nested specs; tensors are not allowed in specs.

    Examples:
        >>> from rlcredit.registry import component_spec
        >>> from rlcredit.weighters import TopFraction
        >>> component_spec(TopFraction(0.2, scope="batch", score="entropy"))
        {'name': 'top_fraction', 'fraction': 0.2, 'scope': 'batch', 'score': 'entropy'}
    """
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (list, tuple)):
        return [component_spec(x) for x in obj]
    if isinstance(obj, Mapping):
        return {k: component_spec(v) for k, v in obj.items()}
    registered = name_of(obj)
    if registered is None or not attrs.has(type(obj)):
        raise SpecError(
            f"{type(obj).__name__} is not a registered attrs component, so it cannot be written as a spec; "
            f"decorate it with @rlcredit.register(kind, name) and make it an attrs class."
        )
    params: dict[str, Any] = {}
    for a in attrs.fields(type(obj)):
        if not a.init:
            continue
        value = getattr(obj, a.name)
        default = a.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory() if not default.takes_self else attrs.NOTHING
        if default is not attrs.NOTHING and _same(value, default):
            continue
        params[a.alias] = component_spec(value)
    name = registered[1]
    return {"name": name, **params} if params else name


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:  # tensors and other objects without plain equality
        return False


# ---------------------------------------------------------------------------------------------
# Strategy specs

_STRATEGY_KEYS = ("estimators", "weighter", "shapers", "policy_loss")


def load_spec_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a strategy spec from a ``.json``, ``.yaml``/``.yml`` or ``.toml`` file (data only).

    Examples:
        >>> import json, tempfile, pathlib, rlcredit
        >>> from rlcredit.registry import load_spec_file
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "s.json"
        >>> _ = path.write_text(json.dumps({"preset": "dapo", "shapers": ["group_center"]}))
        >>> load_spec_file(path)
        {'preset': 'dapo', 'shapers': ['group_center']}
    """
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} does not exist.")
    suffix = p.suffix.lower()
    text = p.read_text()
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as err:
                raise SpecError("reading YAML specs needs PyYAML: pip install 'rlcredit[yaml]'.") from err
            data = yaml.safe_load(text)  # safe_load: configs are data, never objects
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            raise SpecError(f"spec file {str(p)!r}: unknown extension {suffix!r}; use .json, .yaml, .yml or .toml.")
    except SpecError:
        raise
    except Exception as err:
        raise SpecError(f"spec file {str(p)!r} could not be parsed: {err}") from err
    if not isinstance(data, Mapping):
        raise SpecError(f"spec file {str(p)!r} must hold a mapping (a strategy spec), got {type(data).__name__}.")
    return dict(data)


def build(spec: Any, **overrides: Any):
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
        SpecError: an unknown key or parameter, or an unreadable file.

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
    from rlcredit.strategy import Strategy

    bad = sorted(set(overrides) - set(_STRATEGY_KEYS))
    if bad:
        raise SpecError(f"build(): unknown override(s) {', '.join(map(repr, bad))}; accepted: {', '.join(_STRATEGY_KEYS)}.")
    if isinstance(spec, Strategy):
        base = spec
    elif isinstance(spec, (str, os.PathLike)):
        if isinstance(spec, str) and (spec in _REGISTRY["strategy"] or not Path(spec).exists()):
            if spec not in _REGISTRY["strategy"]:
                load_plugins()
            if spec not in _REGISTRY["strategy"]:
                err = _unknown("strategy", spec)
                raise RegistryError(f"{err} A string spec is a preset name or the path of an existing spec file.")
            base = _call_preset(spec)
        else:
            return build(load_spec_file(spec), **overrides)
    elif isinstance(spec, Mapping):
        data = dict(spec)
        preset = data.pop("preset", None)
        unknown = sorted(set(data) - set(_STRATEGY_KEYS))
        if unknown:
            raise SpecError(
                f"strategy spec has unknown key(s) {', '.join(map(repr, unknown))}; accepted: "
                f"{', '.join(('preset',) + _STRATEGY_KEYS)}."
            )
        if preset is not None:
            return build(preset, **{**data, **overrides})
        base = Strategy(**data)
    else:
        raise SpecError(
            f"build() takes a preset name, a spec dict, a spec file path or a Strategy; got {type(spec).__name__}."
        )
    return attrs.evolve(base, **overrides) if overrides else base


def _call_preset(name: str):
    from rlcredit.strategy import Strategy

    strategy = _REGISTRY["strategy"][name]()
    if not isinstance(strategy, Strategy):
        raise RegistryError(f"preset {name!r} returned {type(strategy).__name__}, expected a rlcredit.Strategy.")
    return strategy


def import_optional(module: str, extra: str, what: str) -> Any:
    """Import an optional dependency or raise a clear error naming the extra to install."""
    try:
        return import_module(module)
    except ImportError as err:
        raise SpecError(f"{what} needs the {module!r} package: pip install 'rlcredit[{extra}]'.") from err
