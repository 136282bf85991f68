"""The ``rlcredit`` console script: ``rlcredit demo`` and ``rlcredit inspect``.

Argument parsing only; the work lives in ``rlcredit_mm`` (imported when a subcommand runs, so the
core keeps no dependency on the multimodal package). Exit codes: 0 success, 2 bad input (argparse's
convention: unknown flags, bad values, unknown presets, unusable paths), 130 interrupted.

Examples:
    >>> from rlcredit.cli import build_parser
    >>> args = build_parser().parse_args(["demo", "--quick", "--presets", "grpo,vppo"])
    >>> args.command, args.quick, args.presets
    ('demo', True, ('grpo', 'vppo'))
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]


def _presets(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.replace(" ", ",").split(",") if n)
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated preset names, e.g. grpo,vppo")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rlcredit`` command."""
    parser = argparse.ArgumentParser(
        prog="rlcredit",
        description="Composable token-level credit assignment for RL of language and vision-language models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,inspect}")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="train presets on a synthetic visual-reasoning task and compare them (CPU, no download)",
        description="A complete RL run on a synthetic visual task (coloured shapes; 'what colour is the square?') "
                    "with a tiny Qwen2.5-VL: trains each preset over several seeds, prints a results table and "
                    "writes results.json, learning curves and token heatmaps to --out.",
    )
    demo.add_argument("--presets", type=_presets, default=None,
                      help="comma-separated presets (default: grpo,dapo,entropy_forks,vppo,at_rl)")
    demo.add_argument("--seeds", type=_positive_int, default=None, help="number of seeds, 0..N-1 (default 3; --quick: 1)")
    demo.add_argument("--steps", type=_positive_int, default=None, help="RL steps per run (default 100; --quick: 4)")
    demo.add_argument("--shapes", type=_positive_int, default=None,
                      help="shapes per picture, 1-3 (default 1; 2-3 make the model find the asked shape)")
    demo.add_argument("--threshold", type=_fraction, default=None,
                      help="held-out accuracy for 'steps to threshold' (default 0.6)")
    demo.add_argument("--lr", type=_positive_float, default=None, help="AdamW learning rate of the RL updates (default 1e-3)")
    demo.add_argument("--out", default="rlcredit-demo", help="output folder (default ./rlcredit-demo/)")
    demo.add_argument("--quick", action="store_true", help="a smoke run (< 60 s on 2 cores): 1 seed, 4 steps")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    inspect = sub.add_parser(
        "inspect",
        help="per-token visual dependency and connectivity of one response, as an HTML (and PNG) heatmap",
        description="Loads a local transformers VLM (save_pretrained folder with its processor), scores every "
                    "token of RESPONSE by visual dependency (exact KL with and without the picture, VPPO) and "
                    "connectivity (attention mass on image tokens, AT-RL), and writes a heatmap.",
    )
    inspect.add_argument("--model", required=True, help="save_pretrained() folder of the VLM and its processor")
    inspect.add_argument("--image", required=True, help="the picture (PNG, JPEG...)")
    inspect.add_argument("--prompt", required=True, help="the question")
    inspect.add_argument("--response", required=True, help="the response text to score")
    inspect.add_argument("--out", default="inspect.html", help="HTML file to write (default inspect.html)")
    inspect.add_argument("--png", action="store_true", help="also write a PNG next to the HTML")
    inspect.add_argument("--perturbation", default="constant",
                         help="I' for the visual dependency: constant (black picture, default), patch_blackout, "
                              "gaussian_noise, blur, drop")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rlcredit`` command; returns the exit code (argparse errors exit 2 themselves)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "demo":
            from rlcredit_mm.demo.run import main as run
        else:
            from rlcredit_mm.inspect import main as run
    except ImportError as err:
        print(f"rlcredit {args.command}: error: needs the multimodal extra ({err}); "
              f"pip install 'rlcredit[mm]'.", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
