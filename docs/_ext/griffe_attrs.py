"""A griffe extension that gives attrs classes the ``__init__`` attrs generates, for the API reference.

griffe reads the source statically and so never sees the ``__init__`` that ``@attrs.frozen`` /
``@attrs.define`` write at import time: without this extension the API reference shows an attrs
component with no signature (or a base class's ``(*parts, **kwargs)``) and its defaults nowhere.
Here each attrs class without an ``__init__`` in its own body gets one built from its fields, the
way attrs builds it: fields of attrs base classes first, ``init=False`` fields left out, a leading
underscore dropped from the parameter name (or ``alias=``), ``default=`` / ``factory=`` /
``attrs.Factory`` as the default, ``kw_only`` fields keyword-only. mkdocstrings then shows it as the
class signature (``merge_init_into_class``) and fills each documented parameter's type and default.

A class declared ``init=False`` that inherits a hand-written ``__init__`` (``Intersect`` and
``Union`` accept ``Op(a, b)``, ``Op([a, b])`` and ``Op(parts=[a, b])``) is shown with its fields,
``Op(parts)``: one of the forms it accepts, and the one a spec dict uses.

Loaded by mkdocstrings (``extensions:`` in mkdocs.yml); static only, so the docs build imports
neither torch nor rlcredit.
"""

from __future__ import annotations

from typing import Any

import griffe

# Decorators that make a class an attrs class, and calls that declare an attrs field.
_CLASS_DECORATORS = {
    f"{mod}.{name}"
    for mod in ("attrs", "attr")
    for name in ("define", "frozen", "mutable", "s", "attrs", "dataclass")
}
_FIELD_CALLS = {"attrs.field", "attr.field", "attr.ib", "attr.attrib"}
_FACTORY_CALLS = {"attrs.Factory", "attr.Factory"}


def _attrs_decorator(cls: griffe.Class) -> griffe.Expr | None:
    for decorator in cls.decorators:
        value = decorator.value
        if isinstance(value, griffe.Expr) and value.canonical_path in _CLASS_DECORATORS:
            return value
    return None


def _keywords(expr: Any) -> dict[str, Any]:
    """The keyword arguments of a call expression (``{}`` for anything else)."""
    if not isinstance(expr, griffe.ExprCall):
        return {}
    return {arg.name: arg.value for arg in expr.arguments if isinstance(arg, griffe.ExprKeyword)}


def _is_field_call(value: Any) -> bool:
    return isinstance(value, griffe.ExprCall) and value.canonical_path in _FIELD_CALLS


def _default(value: Any, field_args: dict[str, Any]) -> str | griffe.Expr | None:
    """The default as the signature shows it: ``f()`` for a factory, None when the field is required."""
    if "factory" in field_args:
        return griffe.ExprCall(function=field_args["factory"], arguments=[])
    # `x: int = attrs.field(default=3)`, or `x: int = 3` (a field with default 3)
    default = field_args.get("default") if _is_field_call(value) else value
    if isinstance(default, griffe.ExprCall) and default.canonical_path in _FACTORY_CALLS and default.arguments:
        return griffe.ExprCall(function=default.arguments[0], arguments=[])  # attrs.Factory(f) -> f()
    return default


def _own_fields(cls: griffe.Class) -> list[griffe.Parameter]:
    """The ``__init__`` parameters for the fields declared in the body of one attrs class."""
    class_kw_only = str(_keywords(_attrs_decorator(cls)).get("kw_only")) == "True"
    params = []
    for member in cls.members.values():
        if member.is_alias or not member.is_attribute or "property" in member.labels:
            continue
        annotated = member.annotation is not None and "instance-attribute" in member.labels
        if not (annotated or _is_field_call(member.value)):
            continue  # a plain class attribute, or a ClassVar: not a field
        field_args = _keywords(member.value) if _is_field_call(member.value) else {}
        if str(field_args.get("init")) == "False":
            continue
        alias = field_args.get("alias")
        name = str(alias).strip("'\"") if alias is not None else member.name.lstrip("_")
        kw_only = class_kw_only or str(field_args.get("kw_only")) == "True"
        params.append(griffe.Parameter(
            name,
            annotation=member.annotation,
            kind=griffe.ParameterKind.keyword_only if kw_only else griffe.ParameterKind.positional_or_keyword,
            default=_default(member.value, field_args),
            docstring=member.docstring,
        ))
    return params


def _init_parameters(cls: griffe.Class) -> list[griffe.Parameter]:
    """All fields, base classes' first (a field redefined in a subclass takes the subclass's place)."""
    try:
        bases = list(reversed(cls.mro()))
    except ValueError:  # an unresolvable base: use the class's own fields only
        bases = []
    by_name: dict[str, griffe.Parameter] = {}
    for klass in [*bases, cls]:
        if _attrs_decorator(klass) is not None:
            for param in _own_fields(klass):
                by_name.pop(param.name, None)
                by_name[param.name] = param
    params = list(by_name.values())
    kinds = griffe.ParameterKind
    return [p for p in params if p.kind is not kinds.keyword_only] + [p for p in params if p.kind is kinds.keyword_only]


def _add_init(cls: griffe.Class) -> None:
    if _attrs_decorator(cls) is not None and "__init__" not in cls.members:
        init = griffe.Function(
            "__init__",
            lineno=cls.lineno,
            endlineno=cls.lineno,
            parent=cls,
            parameters=griffe.Parameters(
                griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword),
                *_init_parameters(cls),
            ),
            returns="None",
        )
        cls.set_member("__init__", init)
        cls.labels.add("attrs")
    for member in list(cls.members.values()):
        if not member.is_alias and member.is_class:
            _add_init(member)


class AttrsInit(griffe.Extension):
    """Give every attrs class in a loaded package the ``__init__`` attrs would generate."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._visit(pkg)

    def _visit(self, module: griffe.Module) -> None:
        for member in list(module.members.values()):
            if member.is_alias:
                continue
            if member.is_module:
                self._visit(member)
            elif member.is_class:
                _add_init(member)
