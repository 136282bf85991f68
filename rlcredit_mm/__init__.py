"""rlcredit_mm: multimodal credit (VPPO visual dependency, AT-RL attention connectivity and anchors).

Importing it registers its estimators, weighters, perturbations and adapters; ``rlcredit`` finds it
through the ``rlcredit.plugins`` entry point, so ``rlcredit.build("vppo")`` works after a plain
``import rlcredit``.
"""

from rlcredit_mm import adapters, perturb  # noqa: E402,F401  (register adapters and perturbations)
from rlcredit_mm.visual_kl import VisualKL  # noqa: E402  (VPPO; registers "visual_kl")
from rlcredit_mm.anchors import AnchorClusters  # noqa: E402  (AT-RL; registers "anchor_clusters")
from rlcredit_mm.connectivity import AttentionConnectivity  # noqa: E402  (AT-RL; registers "attention_connectivity")
