"""The ``rlcredit`` console script: ``rlcredit demo`` and ``rlcredit inspect``.

It lives in ``rlcredit_mm`` because both commands are multimodal; the core package never imports
it. ``rlcredit`` alone prints the help, ``rlcredit --version`` the version.

The ``demo`` flags are derived from ``rlcredit_mm.demo.train.DemoConfig``: every field with
``help`` metadata becomes ``--field-name`` (``--no-field-name`` for a boolean that defaults to
True), typed by the field's annotation; its default and its validator stay in the field.
``--quick`` starts from ``DemoConfig.quick`` (a bundle of smaller values for a smoke run) and the
flags given override it. The ``inspect`` defaults are those of ``run_inspect``.

Exit codes: 0 success, 2 bad input (argparse's convention: unknown flags, values that do not
parse, values a validator rejects, unknown presets, unusable paths), 130 interrupted.

Examples:
    >>> args = build_parser().parse_args(["demo", "--quick", "--presets", "grpo,vppo", "--seeds", "2"])
    >>> args.command, args.quick, args.presets, args.seeds, args.steps
    ('demo', True, 'grpo,vppo', 2, None)
    >>> cfg = config_from_args(args)
    >>> cfg.presets, cfg.seeds, cfg.steps
    (('grpo', 'vppo'), 2, 4)
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any

import attrs

import rlcredit
from rlcredit.errors import RLCreditError
from rlcredit_mm.demo.run import DEFAULT_OUT
from rlcredit_mm.demo.train import QUICK, DemoConfig
from rlcredit_mm.inspect.command import run_inspect

__all__ = ["build_parser", "config_from_args", "main"]

_EXTRAS = ("PIL", "pymetis", "matplotlib", "tqdm")
"""Top-level modules of the ``mm`` extra; the commands import them when they need them."""


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _demo_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``DemoConfig`` field with ``help`` metadata; default None = "not given"."""
    hints = typing.get_type_hints(DemoConfig)
    for field in attrs.fields(DemoConfig):
        help_text = field.metadata.get("help")
        if help_text is None:
            continue
        flag = "--" + field.name.replace("_", "-")
        quick = f"; --quick: {_show(QUICK[field.name])}" if field.name in QUICK else ""
        kind = hints[field.name]
        if kind is bool:
            if field.default:
                parser.add_argument("--no-" + flag[2:], dest=field.name, action="store_const", const=False,
                                    default=None, help=f"no {help_text}")
            else:
                parser.add_argument(flag, dest=field.name, action="store_const", const=True, default=None,
                                    help=help_text)
            continue
        # Only the syntax is checked here (argparse says "invalid int value"); DemoConfig's validators
        # check the value, so each rule lives in one place.
        convert = kind if kind in (int, float) else str
        parser.add_argument(flag, dest=field.name, type=convert, default=None, metavar=field.name.upper(),
                            help=f"{help_text} (default {_show(field.default)}{quick})")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The ``DemoConfig`` of parsed ``rlcredit demo`` flags: ``--quick`` first, then the flags given.

    Raises:
        rlcredit.SpecError: a value a ``DemoConfig`` validator rejects.

    Examples:
        >>> config_from_args(build_parser().parse_args(["demo", "--steps", "7", "--no-progress"]))  # doctest: +ELLIPSIS
        DemoConfig(presets=(...), seeds=..., steps=7, ..., progress=False)
    """
    given = {f.name: getattr(args, f.name) for f in attrs.fields(DemoConfig)
             if getattr(args, f.name, None) is not None}
    return DemoConfig.quick(**given) if args.quick else DemoConfig(**given)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``rlcredit`` command."""
    parser = argparse.ArgumentParser(
        prog="rlcredit",
        description="Composable token-level credit assignment for RL of language and vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"rlcredit {rlcredit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,inspect}")

    demo = sub.add_parser(
        "demo",
        help="train presets on a synthetic visual-reasoning task and compare them (CPU, no download)",
        description="A complete RL run on a synthetic visual task (coloured shapes; 'what colour is the square?') "
                    "with a tiny Qwen2.5-VL: trains each preset over several seeds, prints a results table and "
                    "writes results.json, learning curves and token heatmaps to --out.",
    )
    _demo_flags(demo)
    demo.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default ./{DEFAULT_OUT}/)")
    quick = ", ".join(f"{k}={_show(v)}" for k, v in QUICK.items())
    demo.add_argument("--quick", action="store_true",
                      help=f"a smoke run (< 60 s on 2 cores) with smaller values ({quick}); the flags given override "
                           f"them")

    defaults = {k: p.default for k, p in inspect.signature(run_inspect).parameters.items()}
    ins = sub.add_parser(
        "inspect",
        help="per-token visual dependency and connectivity of one response, as an HTML (and PNG) heatmap",
        description="Loads a local transformers VLM (save_pretrained folder with its processor), scores every "
                    "token of RESPONSE by visual dependency (exact KL with and without the picture, VPPO) and "
                    "connectivity (attention mass on image tokens, AT-RL), and writes a heatmap.",
    )
    ins.add_argument("--model", dest="model_dir", metavar="DIR", required=True,
                     help="save_pretrained() folder of the VLM and its processor")
    ins.add_argument("--image", required=True, help="the picture (PNG, JPEG...)")
    ins.add_argument("--prompt", required=True, help="the question")
    ins.add_argument("--response", required=True, help="the response text to score")
    ins.add_argument("--out", default=argparse.SUPPRESS, help=f"HTML file to write (default {defaults['out']})")
    ins.add_argument("--png", action="store_true", default=argparse.SUPPRESS, help="also write a PNG next to the HTML")
    ins.add_argument("--perturbation", default=argparse.SUPPRESS,
                     help=f"I' for the visual dependency: constant (black picture), patch_blackout, gaussian_noise, "
                          f"blur, drop (default {defaults['perturbation']})")
    return parser


def _run(args: argparse.Namespace) -> None:
    if args.command == "demo":
        from rlcredit_mm.demo.run import run_demo

        run_demo(config_from_args(args), args.out)
    else:
        given = {k: v for k, v in vars(args).items() if k != "command"}
        for path in run_inspect(**given):
            print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rlcredit`` command; returns the exit code (argparse errors exit 2 themselves).

    Examples:
        >>> main(["demo", "--presets", "vpo"])
        2
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    name = f"rlcredit {args.command}"
    try:
        _run(args)
    except RLCreditError as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in _EXTRAS:
            raise
        print(f"{name}: error: needs the multimodal extra ({err}); pip install 'rlcredit[mm]'.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
