"""The rlcredit error hierarchy.

Every error the library raises on bad input is an :class:`RLCreditError` (itself a
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

    Raised by :class:`rlcredit.Rollout` validation (the message names the field, the expected and
    the actual value), by functional kernels on mismatched inputs, and by ``Strategy.assign`` when a
    rollout lacks what a component ``requires``.
    """


class RegistryError(RLCreditError):
    """An unknown or duplicate registry name (the message lists the available names)."""


class SpecError(RLCreditError):
    """A strategy spec or component hyper-parameter is invalid (unknown key, bad value, bad file)."""


class AdapterError(RLCreditError):
    """A model architecture is not supported by any registered ``rlcredit_mm`` adapter."""
