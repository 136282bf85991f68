"""rlcredit: composable token-level credit assignment for RL of language and vision-language models.

Estimators score tokens, a weighter turns scores into per-token weights, a shaper chain turns
rewards into advantages, and a policy loss puts them together; a registry builds any mix of them
from Python or from a config. See https://rlcredit docs (``docs/``) and DESIGN.md.

Examples:
    >>> import torch, rlcredit
    >>> strategy = rlcredit.build("grpo")
    >>> rollout = rlcredit.Rollout(torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    >>> strategy.assign(rollout).advantages
    tensor([ 0.7071, -0.7071])
"""

from rlcredit import functional
from rlcredit.errors import AdapterError, RegistryError, RLCreditError, RolloutError, SpecError
from rlcredit.policy import HFPolicy
from rlcredit.registry import available, get, register
from rlcredit.rollout import Credit, EstimatorOutput, LossOutput, Rollout
from rlcredit.strategy import Strategy
from rlcredit.specs import build
from rlcredit import estimators, losses, presets, shapers, weighters  # noqa: E402,F401  (register built-ins)
from rlcredit import requirements, validators  # noqa: E402,F401  (public modules)

__version__ = "0.1.0"

__all__ = [
    "Rollout", "Credit", "LossOutput", "EstimatorOutput", "Strategy", "HFPolicy",
    "build", "register", "get", "available",
    "RLCreditError", "RolloutError", "RegistryError", "SpecError", "AdapterError",
    "functional", "__version__",
]
