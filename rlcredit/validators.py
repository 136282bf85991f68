"""The attrs validators and converters components use for their hyper-parameters (plugins too).

A component's hyper-parameters are attrs fields validated at construction, from Python and from
specs alike, so a bad value fails where it is written, with a ``rlcredit.SpecError`` naming the
class, the field, what was expected and what was given. Each rule lives once: the real-number rule
is the one the functional kernels apply (``rlcredit.functional._checks.real_problem``: finite,
within float32's range, in the interval), the integer rule ``int_problem``.

NumPy scalars (``np.float32(0.5)``, ``np.int64(3)``) are accepted like Python numbers: the
``to_number`` converter stores them as the equal Python ``float`` or ``int``, so that a component
compares, prints and writes its spec (``to_spec()``, JSON/YAML) exactly as if it had been given
the Python number. Give every numeric field both::

    clip_low: float = attrs.field(default=0.2, converter=to_number, validator=in_range(0.0, 1.0, hi_open=True))

Examples:
    >>> import attrs, rlcredit
    >>> from rlcredit.validators import in_range, one_of
    >>> @attrs.frozen
    ... class Cap:
    ...     value: float = attrs.field(default=1.0, validator=in_range(0.0, lo_open=True))
    ...     mode: str = attrs.field(default="hard", validator=one_of("hard", "soft"))
    >>> try:
    ...     Cap(value=float("inf"))
    ... except rlcredit.SpecError as err:
    ...     print(err)
    Cap.value must be a finite number in (0.0, inf), got inf.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rlcredit.errors import SpecError
from rlcredit.functional._checks import TOKEN_WEIGHT_MAX, int_problem, real_problem
from rlcredit.registry import build_component

__all__ = ["in_range", "one_of", "int_at_least", "is_bool", "non_empty_str", "optional_str", "token_weight",
           "to_number", "to_component", "to_components"]


def _where(instance: Any, attribute: Any) -> str:
    return f"{type(instance).__name__}.{attribute.name}"


def to_number(value: Any) -> Any:
    """attrs converter: a NumPy (or other ``numbers``) scalar as the equal Python ``int`` or ``float``.

    Anything else (a Python number, None, a bool, a string...) is returned unchanged, for the
    field's validator to accept or reject. Pair it with ``in_range`` or ``int_at_least``.

    Examples:
        >>> import numpy as np
        >>> from rlcredit.validators import to_number
        >>> to_number(np.float32(0.5)), to_number(np.int64(3)), to_number(None), to_number("x")
        (0.5, 3, None, 'x')
    """
    import numbers

    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """attrs validator: a finite real number (not a bool; NumPy scalars accepted) in the interval.

    The number must also lie within float32's range (``|x| <= 3.4e38``), where the maths runs.

    Examples:
        >>> import attrs
        >>> from rlcredit.validators import in_range, to_number
        >>> @attrs.frozen
        ... class Clip:
        ...     eps: float = attrs.field(default=0.2, converter=to_number, validator=in_range(0.0, 1.0, hi_open=True))
        >>> Clip(0.3).eps
        0.3
    """

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        problem = real_problem(value, low=lo, high=hi, low_open=lo_open, high_open=hi_open)
        if problem is not None:
            raise SpecError(f"{_where(instance, attribute)} {problem}.")

    return validate


def token_weight(instance: Any, attribute: Any, value: Any) -> None:
    """attrs validator: a token weight a weighter hands out, a finite number in ``[0, 1e20]``.

    The range ``rlcredit.Credit`` accepts for token weights: checked where the weight is written.

    Examples:
        >>> import attrs
        >>> from rlcredit.validators import to_number, token_weight
        >>> @attrs.frozen
        ... class Boost:
        ...     w: float = attrs.field(default=2.0, converter=to_number, validator=token_weight)
        >>> Boost().w
        2.0
    """
    in_range(0.0, TOKEN_WEIGHT_MAX)(instance, attribute, value)


def one_of(*choices: Any):
    """attrs validator: the value is one of ``choices`` (the message lists them).

    Examples:
        >>> import attrs
        >>> from rlcredit.validators import one_of
        >>> @attrs.frozen
        ... class Pick:
        ...     scope: str = attrs.field(default="batch", validator=one_of("batch", "group"))
        >>> Pick("group").scope
        'group'
    """

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        try:
            ok = any(value == c and type(value) is type(c) for c in choices)
        except Exception:  # objects whose == raises (tensors) are never a valid choice
            ok = False
        if not ok:
            raise SpecError(f"{_where(instance, attribute)} must be one of {', '.join(map(repr, choices))}, got {value!r}.")

    return validate


def int_at_least(lo: int):
    """attrs validator: an int (not a bool; NumPy integers accepted) ``>= lo`` and at most ``2**63 - 1``.

    Examples:
        >>> import attrs
        >>> from rlcredit.validators import int_at_least, to_number
        >>> @attrs.frozen
        ... class Chunks:
        ...     size: int = attrs.field(default=8, converter=to_number, validator=int_at_least(1))
        >>> Chunks(3).size
        3
    """

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        problem = int_problem(value, low=lo)
        if problem is not None:
            raise SpecError(f"{_where(instance, attribute)} {problem}.")

    return validate


def is_bool(instance: Any, attribute: Any, value: Any) -> None:
    """attrs validator: exactly True or False.

    Examples:
        >>> import attrs
        >>> from rlcredit.validators import is_bool
        >>> @attrs.frozen
        ... class Flag:
        ...     on: bool = attrs.field(default=False, validator=is_bool)
        >>> Flag(True).on
        True
    """
    if not isinstance(value, bool):
        raise SpecError(f"{_where(instance, attribute)} must be True or False, got {value!r}.")


def non_empty_str(instance: Any, attribute: Any, value: Any) -> None:
    """attrs validator: a non-empty string (a signal key, a name).

    Examples:
        >>> import attrs
        >>> from rlcredit.validators import non_empty_str
        >>> @attrs.frozen
        ... class Reads:
        ...     key: str = attrs.field(validator=non_empty_str)
        >>> Reads("prm").key
        'prm'
    """
    if not isinstance(value, str) or not value:
        raise SpecError(f"{_where(instance, attribute)} must be a non-empty string, got {value!r}.")


def optional_str(instance: Any, attribute: Any, value: Any) -> None:
    """attrs validator: a non-empty string (a score name) or None.

    Examples:
        >>> import attrs
        >>> from rlcredit.validators import optional_str
        >>> @attrs.frozen
        ... class Reads:
        ...     score: str | None = attrs.field(default=None, validator=optional_str)
        >>> Reads("visual").score
        'visual'
    """
    if value is not None and (not isinstance(value, str) or not value):
        raise SpecError(f"{_where(instance, attribute)} must be a score name (a non-empty str) or None, got {value!r}.")


def to_component(kind: str):
    """attrs converter: a component of ``kind`` from a registered name, a spec dict or an object.

    Examples:
        >>> import attrs
        >>> from rlcredit.validators import to_component
        >>> @attrs.frozen
        ... class Wrap:
        ...     part: object = attrs.field(converter=to_component("weighter"))
        >>> Wrap({"name": "top_fraction", "fraction": 0.5}).part
        TopFraction(fraction=0.5, scope='sequence', score=None, count='exact')
    """

    def convert(spec: Any) -> Any:
        return build_component(kind, spec)

    return convert


def to_components(kind: str):
    """attrs converter: a tuple of components of ``kind`` from a list of specs.

    Examples:
        >>> import attrs
        >>> from rlcredit.validators import to_components
        >>> @attrs.frozen
        ... class Chain:
        ...     parts: tuple = attrs.field(converter=to_components("shaper"))
        >>> Chain(["group_center"]).parts
        (GroupCenter(),)
    """

    def convert(specs: Iterable[Any]) -> tuple:
        if isinstance(specs, (str, Mapping)) or not isinstance(specs, Iterable):
            raise SpecError(f"expected a list of {kind}s, got {specs!r}.")
        return tuple(build_component(kind, s) for s in specs)

    return convert
