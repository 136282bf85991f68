"""rlcredit's benchmark suite: ``python -m benchmarks [--quick] [--only NAME] [--out DIR]``.

Every module ``benchmarks/bench_*.py`` defines ``run(quick: bool) -> list[dict]``, returning rows

    {name, baseline, candidate, time_ratio, memory_ratio, target, notes[, status]}

built with ``benchmarks._util.row``. ``time_ratio`` is candidate time / baseline time, both
measured in the same process with ``torch.utils.benchmark`` (median of interleaved repeats);
``memory_ratio`` is candidate / baseline peak memory, each measured in a fresh process. Below 1
the candidate is cheaper. ``target`` is ``"<= 1.15x"``, ``">= 1x"`` (time ratio) or
``"mem <= 0.5x"`` (memory ratio), or free text with an explicit ``status``; targets are reported
(``ok`` / ``miss``), never asserted, and absolute times go to ``notes`` for context only.

The runner (``benchmarks/__main__.py``) writes ``benchmarks/results/results.json`` (rows, the
environment and per-module run metadata) and ``results.md`` (the Markdown tables quoted by
``docs/performance.md``). ``--only`` re-runs some modules and keeps the stored rows of the others.

Adding a benchmark: create ``benchmarks/bench_NAME.py`` with ``run(quick)``; use the helpers of
``benchmarks._util`` (``time_ratio``, ``peak_memory``/``memory_ratio``, ``row``). Keep
``--quick`` short (well under a minute per module) and the full run under a few minutes.
"""
