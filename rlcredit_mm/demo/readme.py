"""``python -m rlcredit_mm.demo.readme RESULTS FILE...``: rewrite the generated results block of each
Markdown ``FILE`` (``README.md``, ``docs/demo.md``) from ``RESULTS``, a default run's ``results.json``
(``rlcredit_mm.demo.report.update_readme``; the last step of ``rlcredit_mm.demo.run.REGENERATE``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from rlcredit_mm.demo.report import update_readme

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the blocks; returns the exit code (2: bad arguments).

    Examples:
        >>> main([])
        2
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2:
        print("usage: python -m rlcredit_mm.demo.readme RESULTS.json FILE.md [FILE.md ...]", file=sys.stderr)
        return 2
    with open(args[0], encoding="utf-8") as f:
        results = json.load(f)
    for path in args[1:]:
        print(f"{path}: {'updated' if update_readme(path, results) else 'unchanged'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
