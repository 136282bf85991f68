"""Run the benchmark suite: ``python -m benchmarks [--quick] [--only NAME ...] [--out DIR]``.

Discovers ``benchmarks/bench_*.py``, calls each module's ``run(quick)``, prints each module's
rows as they come, and writes ``results.json`` and ``results.md`` to ``--out``
(default ``benchmarks/results``). A module that raises is reported (and makes the exit status 1)
without stopping the others; a missed target is reported only.

Allocator: on Linux the suite re-runs itself with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at
32 MiB (the ceiling of glibc's own adaptive threshold) and ``MALLOC_TRIM_THRESHOLD_`` at 1 GiB
(``--allocator steady``, the default), so that freed ``[B, T]`` buffers are reused instead of
being returned to the OS and page-faulted back in on the next allocation; blocks above 32 MiB
are mmapped as usual. With the system defaults (``--allocator system``) whether a given buffer
faults depends on the heap's history, which made the same step vary by 1.5x between runs and
swamped the differences being measured; reusing freed memory is what jemalloc/tcmalloc (which
PyTorch's CPU tuning guide recommends) do anyway. Baseline and candidate always share it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import pkgutil
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import benchmarks
from benchmarks._util import ROOT

#: glibc settings of ``--allocator steady``: blocks up to 32 MiB (glibc's own ceiling for its
#: adaptive mmap threshold, e.g. every [B, T] buffer of the strategy benchmarks) come from a heap
#: that is never trimmed; larger ones (full-vocabulary logits) are still mmapped, as by default.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}

ROW_KEYS = ("name", "baseline", "candidate", "time_ratio", "memory_ratio", "target", "notes")
_TARGET = re.compile(r"^\s*(mem(?:ory)?\s+)?(<=|>=|<|>|≤|≥)\s*([0-9.]+)\s*[x×]?\s*$")


def discover() -> list[str]:
    """Names (without ``bench_``) of the benchmark modules, sorted."""
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__)
                  if m.name.startswith("bench_"))


def status_of(r: dict[str, Any]) -> str:
    """``ok`` / ``miss`` for a parseable target (or the row's own ``status``), else ``""``."""
    if r.get("status"):
        return str(r["status"])
    target = r.get("target")
    m = _TARGET.match(target) if isinstance(target, str) else None
    if not m:
        return ""
    value = r.get("memory_ratio") if m.group(1) else r.get("time_ratio")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    op, bound = m.group(2), float(m.group(3))
    ok = {"<=": value <= bound, "≤": value <= bound, "<": value < bound,
          ">=": value >= bound, "≥": value >= bound, ">": value > bound}[op]
    return "ok" if ok else "miss"


def allocator() -> str:
    """How this process's allocator is set up (see ``--allocator``)."""
    if all(k in os.environ for k in STEADY_MALLOC):
        return "steady (" + ", ".join(f"{k}={os.environ[k]}" for k in STEADY_MALLOC) + ")"
    return "system default"


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads_timing": 1,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "allocator": allocator(),
    }
    try:
        import rlcredit

        env["rlcredit"] = rlcredit.__version__
    except Exception:  # noqa: BLE001 - the environment record must not fail the run
        pass
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip() or None
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    return env


def _check_rows(module: str, rows: Any) -> list[dict[str, Any]]:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TypeError(f"bench_{module}.run must return a list of dicts, got {type(rows).__name__}")
    for r in rows:
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise TypeError(f"bench_{module}: row {r.get('name')!r} lacks {missing} (use benchmarks._util.row)")
    return rows


def _fmt_ratio(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.3f}×" if abs(x) < 100 else f"{x:.3g}×"


def _cell(x: Any) -> str:
    return str(x if x not in (None, "") else "—").replace("|", "\\|").replace("\n", " ")


def markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `python -m benchmarks` on {results['generated']}. "
        f"Python {env.get('python')}, torch {env.get('torch')}, {env.get('cpu_count')} CPUs "
        f"({env.get('processor')}), GPU: {env.get('cuda') or 'none'}; timings single-threaded "
        f"(`torch.utils.benchmark`, median of interleaved repeats), memory from separate processes; "
        f"allocator: {env.get('allocator', 'system default')}.",
        "",
        "Ratios are candidate / baseline: below 1 the candidate is cheaper. Targets are reported, "
        "never asserted.",
    ]
    for module in sorted(results["modules"]):
        meta = results["modules"][module]
        rows = [r for r in results["rows"] if r.get("module") == module]
        mode = "quick" if meta.get("quick") else "full"
        lines += ["", f"## {module}", "",
                  f"{mode} run, {meta.get('seconds', 0):.0f} s, {meta.get('finished', '')}, "
                  f"allocator: {meta.get('allocator', 'system default')}"]
        if meta.get("error"):
            lines += ["", f"**failed:** `{_cell(meta['error'])}`"]
        if rows:
            lines += ["", "| benchmark | baseline | candidate | time ratio | memory ratio | target | status | notes |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append("| " + " | ".join([
                    _cell(r["name"]), _cell(r["baseline"]), _cell(r["candidate"]),
                    _fmt_ratio(r["time_ratio"]), _fmt_ratio(r["memory_ratio"]), _cell(r["target"]),
                    _cell(r.get("status")), _cell(r["notes"]),
                ]) + " |")
    return "\n".join(lines) + "\n"


def _finite(x: Any) -> Any:
    """NaN/inf -> None, so that results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    available = discover()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help=f"run only these modules (repeatable or comma-separated): {', '.join(available)}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="output folder for results.json and results.md (default: benchmarks/results)")
    parser.add_argument("--list", action="store_true", help="list the benchmark modules and exit")
    parser.add_argument("--allocator", choices=("steady", "system"), default="steady",
                        help="steady (default): re-run with glibc's trim/mmap thresholds raised (see the module "
                             "docstring); system: the allocator as configured")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(available))
        return 0

    selected = available
    if args.only:
        wanted = [w.strip().removeprefix("bench_").removesuffix(".py") for o in args.only for w in o.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in available]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; available: {', '.join(available)}")
        selected = [m for m in available if m in wanted]

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    previous: dict[str, Any] = {}
    if args.only and json_path.exists():
        try:
            previous = json.loads(json_path.read_text())
        except (OSError, ValueError):
            previous = {}
    modules: dict[str, Any] = {m: v for m, v in previous.get("modules", {}).items()
                               if m not in selected and m in available}
    rows: list[dict[str, Any]] = [r for r in previous.get("rows", []) if r.get("module") in modules]

    failed = []
    t_all = time.perf_counter()
    for name in selected:
        print(f"== bench_{name} ({'quick' if args.quick else 'full'})", flush=True)
        t0 = time.perf_counter()
        meta: dict[str, Any] = {"quick": args.quick, "allocator": allocator()}
        try:
            mod = importlib.import_module(f"benchmarks.bench_{name}")
            new = _check_rows(name, mod.run(args.quick))
        except Exception as exc:  # noqa: BLE001 - one broken module must not stop the suite
            traceback.print_exc()
            meta["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            failed.append(name)
            new = []
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        meta["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        modules[name] = meta
        for r in new:
            r = {**r, "module": name}
            r["status"] = status_of(r)
            rows.append(r)
            print(f"  {r['name']:<44} time {_fmt_ratio(r['time_ratio']):>9}  mem {_fmt_ratio(r['memory_ratio']):>9}"
                  f"  target {r['target'] or '—':<14} {r['status']:<5} {r['notes']}", flush=True)
        print(f"   ({meta['seconds']:.1f} s)", flush=True)

    results = {
        "generated": _dt.datetime.now().isoformat(timespec="seconds"),
        "environment": environment(),
        "modules": modules,
        "rows": sorted(rows, key=lambda r: r["module"]),
    }
    json_path.write_text(json.dumps(_finite(results), indent=2, allow_nan=False) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    print(f"wrote {json_path} and {out_dir / 'results.md'} ({time.perf_counter() - t_all:.0f} s)")
    if failed:
        print(f"FAILED modules: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _steady_allocator(argv: list[str]) -> None:
    """Re-execute this command with ``STEADY_MALLOC`` set (Linux, unless already set or
    ``--allocator system``): glibc reads these variables only at process start."""
    if not sys.platform.startswith("linux") or "--allocator=system" in argv:
        return
    if any(a == "--allocator" and b == "system" for a, b in zip(argv, argv[1:])):
        return
    if all(k in os.environ for k in STEADY_MALLOC):
        return
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks", *argv], {**os.environ, **STEADY_MALLOC})


if __name__ == "__main__":
    _steady_allocator(sys.argv[1:])
    sys.exit(main())
