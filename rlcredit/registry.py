"""Registry of components by ``(kind, name)``, component specs, and entry-point plugins.

Classes (and preset factories) are registered, never instances. Library code imports classes
directly; only configs go through names. Configs are data: no ``eval``, no pickle, no import of a
dotted path named in a config. Whole strategy specs (presets, dicts, files) are built by
``rlcredit.build`` (``rlcredit.specs``), which sits above ``rlcredit.strategy``; this module sits
below every component and imports none of them.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Mapping, Sequence
from importlib import import_module, metadata
from typing import Any, TypeVar

import attrs

from rlcredit.errors import RegistryError, RLCreditError, SpecError

__all__ = ["KINDS", "register", "get", "available", "build_component", "component_spec", "load_plugins",
           "plugin_errors"]

KINDS: tuple[str, ...] = ("estimator", "weighter", "shaper", "loss", "perturbation", "adapter", "strategy")
PLUGIN_GROUP = "rlcredit.plugins"

_REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
_NAMES: dict[Any, tuple[tuple[str, str], ...]] = {}
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
        override: replace an existing registration instead of raising. Objects of the replaced
            class keep working, but a spec can no longer name them (the name now builds the new
            class): their ``to_spec()`` raises ``SpecError`` instead of writing a spec that would
            rebuild something else, so ``build(s.to_spec()) == s`` whenever ``to_spec()`` succeeds.
            A class registered under several names is written under the first that still refers
            to it.

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
        _check_registrable(kind, name, obj)
        table = _REGISTRY[kind]
        if name in table and table[name] is not obj and not override:
            raise RegistryError(
                f"{kind} {name!r} is already registered (by {_qualname(table[name])}); pick another name "
                f"or pass override=True to replace it."
            )
        table[name] = obj
        # A class is written in specs under the first of its names that still refers to it:
        # registering it again under an alias does not change the specs (``to_spec``) of the
        # strategies that use it, and a name taken over with override=True is no longer its name.
        names = _NAMES.get(obj, ())
        if (kind, name) not in names:
            _NAMES[obj] = (*names, (kind, name))
        return obj

    return decorator


SPEC_KINDS = ("estimator", "weighter", "shaper", "loss", "perturbation")
"""Kinds whose components are written as specs: they must be attrs classes (their fields are the spec)."""


def _check_registrable(kind: str, name: str, obj: Any) -> None:
    """Only what can be built from a spec and written back as one gets a name."""
    where = f"register({kind!r}, {name!r})"
    if kind == "strategy":
        if not callable(obj):
            raise RegistryError(f"{where}: a preset is a function returning a rlcredit.Strategy, got {obj!r}.")
        return
    if not isinstance(obj, type):
        raise RegistryError(
            f"{where}: register a class (decorate the class itself), not {type(obj).__name__} {obj!r:.60}; "
            f"configs build instances from it."
        )
    if kind in SPEC_KINDS and not attrs.has(obj):
        raise RegistryError(
            f"{where}: {obj.__name__} is not an attrs class; make it one (@attrs.frozen) so that its fields are "
            f"its hyper-parameters and strategy.to_spec() can write it back."
        )


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions and adjacent swaps cost 1."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def closest_name(name: str, names: list[str]) -> str | None:
    """The registered name a typo most likely meant: difflib's close matches, the fewest edits first
    (a swap of two letters is one edit, so ``gpro`` suggests ``grpo``, not ``gtpo``), ties by order.

    Examples:
        >>> from rlcredit.registry import closest_name
        >>> closest_name("gpro", ["gmpo", "grpo", "gtpo"]), closest_name("xyz", ["grpo"])
        ('grpo', None)
    """
    close = difflib.get_close_matches(name, names, n=5)
    return min(close, key=lambda c: _edit_distance(name, c)) if close else None


def _unknown(kind: str, name: str) -> RegistryError:
    names = sorted(_REGISTRY[kind])
    close = closest_name(name, names)
    hint = f" did you mean {close!r}?" if close else ""
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
    """``(kind, name)`` a spec writes for a class (or an instance's class), else None.

    The first name the class was registered under that still refers to it: a name another class
    took over (``register(..., override=True)``) no longer builds this class, so it is skipped.
    """
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    for kind, name in _NAMES.get(cls, ()):
        if _REGISTRY[kind].get(name) is cls:
            return kind, name
    return None


def _taken_over(cls: type) -> str | None:
    """Why ``cls``, once registered, has no name now (another class took it over), or None."""
    names = _NAMES.get(cls)
    if not names:
        return None
    kind, name = names[0]
    return (f"{cls.__name__} cannot be written as a spec: it was registered as {kind} {name!r}, but "
            f"register(..., override=True) gave that name to {_qualname(_REGISTRY[kind][name])}, so a spec naming "
            f"it would build that class instead; register {cls.__name__} under a name of its own, or undo the "
            f"override.")


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
        return _instantiate(kind, spec, get(kind, spec), {})
    if isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("name", None)
        if not isinstance(name, str):
            raise SpecError(f"a {kind} spec dict needs a 'name' key naming a registered {kind}, got {dict(spec)!r}.")
        cls = get(kind, name)
        accepted = _init_names(cls)
        unknown = sorted(set(params) - set(accepted), key=str) if accepted or attrs.has(cls) else []
        if unknown:
            raise SpecError(
                f"{kind} {name!r} got unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"accepted: {', '.join(accepted) or '(none)'}."
            )
        return _instantiate(kind, name, cls, params)
    if isinstance(spec, type):
        raise SpecError(
            f"expected a {kind} object, got the class {spec.__name__}; instantiate it ({spec.__name__}(...)) or pass "
            f"its registered name."
        )
    if spec is None or isinstance(spec, (int, float, bool, Sequence)) or not callable(spec):
        raise SpecError(
            f"expected a {kind}: a registered name, a {{'name': ...}} dict or a {kind} object (callable, with "
            f"`requires`); got {spec!r:.80}."
        )
    return spec


def _instantiate(kind: str, name: str, cls: Any, params: dict[str, Any]) -> Any:
    try:
        return cls(**params)
    except RLCreditError:
        raise
    except (TypeError, ValueError) as err:
        required = [a for a, f in _init_names(cls).items() if f.default is attrs.NOTHING]
        hint = f" required parameter(s): {', '.join(required)}; write {{'name': {name!r}, ...}}." if required else ""
        raise SpecError(f"{kind} {name!r}: {err}.{hint}") from None


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
        raise SpecError(_taken_over(type(obj)) or (
            f"{type(obj).__name__} is not a registered attrs component, so it cannot be written as a spec; "
            f"decorate it with @rlcredit.register(kind, name) and make it an attrs class."
        ))
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
