"""Token-level heatmaps of visual dependency and attention connectivity (HTML and PNG), and ``rlcredit inspect``.

For one picture, prompt and response this module computes, per response token,

* the **visual dependency** of VPPO (Huang et al. 2025, arXiv 2510.09285), the full-vocabulary
  ``S_t = KL(pi(.|s_t, I) || pi(.|s_t, I'))`` (``rlcredit_mm.VisualKL`` with
  ``estimate="exact"``); ``I'`` defaults to the ``constant`` perturbation (an all-black picture in
  the processor's normalised space), so a heatmap is deterministic and reads "how much would this
  token change without the picture"; ``patch_blackout`` gives VPPO's training-time ``I'``;
* the **connectivity** of AT-RL (Jiao et al., arXiv 2602.11455), the attention mass the token's
  query puts on image tokens, sink-debiased (``rlcredit_mm.AttentionConnectivity``),

and renders them as colour-coded tokens next to the picture: a self-contained HTML page (the picture
embedded as a base64 PNG, the exact values in each token's tooltip) or a PNG figure.

Command line (``rlcredit inspect``)::

    rlcredit inspect --model DIR --image FILE --prompt TEXT --response TEXT [--out FILE.html] [--png]

``DIR`` is a ``save_pretrained`` folder of a supported VLM with its processor files; nothing is
downloaded (``HF_HUB_OFFLINE=1`` is set).

Modules: ``scores`` (``token_scores``), ``render`` (``TokenHeatmap``, HTML and PNG), ``inputs``
(loading a model folder, building inputs), ``command`` (``run_inspect``); every name is importable
from ``rlcredit_mm.inspect``.
"""

from rlcredit_mm.inspect.scores import SCORE_NAMES, token_scores
from rlcredit_mm.inspect.render import TokenHeatmap, heatmap_html, heatmap_png
from rlcredit_mm.inspect.inputs import InspectInputs, build_inputs, display_tokens, load_vlm
from rlcredit_mm.inspect.command import run_inspect

__all__ = [
    "SCORE_NAMES", "TokenHeatmap", "InspectInputs", "token_scores", "heatmap_html", "heatmap_png",
    "load_vlm", "build_inputs", "display_tokens", "run_inspect",
]
