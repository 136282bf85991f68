"""Adapters to existing trainers; each imports its framework only when imported itself.

- ``rlcredit.integrations.trl``: ``CreditGRPOTrainer``, TRL's ``GRPOTrainer`` with ``credit=``
  (extra ``rlcredit[trl]``).
- ``rlcredit.integrations.verl``: registers the policy loss and the advantage estimator
  ``"rlcredit"`` in verl's registries when verl is importable (list the module in
  ``VERL_USE_EXTERNAL_MODULES``); imports cleanly without verl.

``import rlcredit`` never imports either module, so neither framework is a dependency of the core.
"""

__all__: list[str] = []
