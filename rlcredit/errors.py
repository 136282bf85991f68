"""The rlcredit error hierarchy.

Every error the library raises on bad input is an ``RLCreditError`` (itself a
``ValueError``), and every message says what was wrong, what was expected and how to fix it.
This module imports nothing: the functional layer may use it too.
"""

from __future__ import annotations

__all__ = ["RLCreditError", "RolloutError", "RegistryError", "SpecError", "AdapterError"]


class RLCreditError(ValueError):
    """Base class of every error rlcredit raises on bad input or bad configuration.

    Catch this to handle any rlcredit error::

        >>> import rlcredit
        >>> try:
        ...     rlcredit.get("weighter", "no_such_weighter")
        ... except rlcredit.RLCreditError as err:
        ...     print(type(err).__name__)
        RegistryError
    """


class RolloutError(RLCreditError):
    """A tensor handed to rlcredit has the wrong shape, dtype, device or values.

    Raised by ``rlcredit.Rollout`` validation (the message names the field, the expected and
    the actual value), by functional kernels on mismatched inputs, and by ``Strategy.assign`` when a
    rollout lacks what a component ``requires``.

    Examples:
        >>> import torch, rlcredit
        >>> try:
        ...     rlcredit.Rollout(torch.ones(2, 3, dtype=torch.bool), torch.zeros(3), torch.zeros(2, dtype=torch.long))
        ... except rlcredit.RolloutError as err:
        ...     print(err)
        Rollout.rewards has shape [3], expected [2] (B rows, T response tokens, right-padded).
    """


class RegistryError(RLCreditError):
    """An unknown or duplicate registry name (the message lists the available names).

    Examples:
        >>> import rlcredit
        >>> try:
        ...     rlcredit.build("dapoo")
        ... except rlcredit.RegistryError as err:
        ...     print(str(err).split(";")[1].strip())
        did you mean 'dapo'? available strategy names: at_rl, ..., vppo_paper. Register your own with @rlcredit.register('strategy', NAME). A string spec is a preset name or the path of an existing spec file (.json, .yaml, .yml, .toml). No file 'dapoo' exists either.
    """


class SpecError(RLCreditError):
    """A strategy spec or component hyper-parameter is invalid (unknown key, bad value, bad file).

    Examples:
        >>> import rlcredit
        >>> try:
        ...     rlcredit.build({"weighter": {"name": "top_fraction", "fraction": 1.5}})
        ... except rlcredit.SpecError as err:
        ...     print(type(err).__name__, "fraction" in str(err))
        SpecError True
    """


class AdapterError(RLCreditError):
    """A model architecture is not supported by any registered ``rlcredit_mm`` adapter.

    Examples:
        >>> import torch, rlcredit
        >>> try:
        ...     rlcredit.HFPolicy(torch.nn.Linear(2, 2))
        ... except rlcredit.AdapterError as err:
        ...     print(str(err)[:38])
        HFPolicy needs a transformers model wi
    """
