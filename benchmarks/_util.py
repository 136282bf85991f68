"""Shared helpers for the benchmark modules: timing ratios, peak memory, result rows.

Every benchmark module (``benchmarks/bench_*.py``) exposes ``run(quick: bool) -> list[dict]`` and
builds its rows with ``row``. Times are compared with ``time_ratio`` (baseline and
candidate timed in the same process, interleaved, median of repeats); memory with
``peak_memory`` / ``memory_ratio``, each configuration in a fresh Python process.

Typical use in a module::

    from benchmarks._util import memory_ratio, row, time_ratio

    def run(quick: bool) -> list[dict]:
        x = torch.randn(256, 2048)
        t = time_ratio(lambda: baseline(x), lambda: candidate(x), quick=quick)
        m = memory_ratio(("benchmarks.bench_mine:case", {"which": "baseline"}),
                         ("benchmarks.bench_mine:case", {"which": "candidate"}))
        return [row("mine", "baseline", "candidate", t, m, target="<= 1.1x")]

    def case(which: str):          # runs in the child process of peak_memory
        x = torch.randn(256, 2048)  # setup: not counted
        return lambda: (baseline if which == "baseline" else candidate)(x)  # measured

Absolute times are printed and stored in the notes for context, never asserted.
"""

from __future__ import annotations

import gc
import importlib
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Timing", "time_fn", "time_ratio", "peak_memory", "memory_ratio", "row", "fit_exponent",
    "fmt_time", "fmt_bytes", "ROOT",
]

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the child processes of ``peak_memory`` run there)."""


# --------------------------------------------------------------------------------------- time


class Timing(dict):
    """Result of ``time_ratio``: ``baseline_s``, ``candidate_s`` (medians, seconds), ``ratio``.

    A dict (JSON-ready) with attribute access for the three fields.
    """

    @property
    def ratio(self) -> float:
        return self["ratio"]

    @property
    def baseline_s(self) -> float:
        return self["baseline_s"]

    @property
    def candidate_s(self) -> float:
        return self["candidate_s"]


def _sync(device: str | None) -> None:
    if device and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timer(fn: Callable[[], Any], num_threads: int):
    from torch.utils import benchmark

    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=num_threads)


def time_fn(fn: Callable[[], Any], *, min_run_time: float = 0.5, num_threads: int = 1,
            warmup: int = 1) -> float:
    """Median seconds per call of ``fn()`` (``torch.utils.benchmark`` blocked autorange).

    Args:
        fn: the zero-argument callable to time. On CUDA it must synchronise itself if its result
            is not consumed (``torch.utils.benchmark`` synchronises around each block).
        min_run_time: seconds of measurement (at least one block runs whatever this is).
        num_threads: torch intra-op threads while timing (1 by default: ratios on a shared
            machine are steadier single-threaded; recorded in the environment of the results).
        warmup: untimed calls first (lazy initialisation, allocator warm-up).

    Returns:
        The median time of one call, in seconds.
    """
    for _ in range(warmup):
        fn()
    return float(_timer(fn, num_threads).blocked_autorange(min_run_time=min_run_time).median)


def time_ratio(baseline_fn: Callable[[], Any], candidate_fn: Callable[[], Any], *, quick: bool = False,
               min_run_time: float | None = None, rounds: int | None = None,
               num_threads: int = 1) -> Timing:
    """Time ``candidate_fn`` against ``baseline_fn`` in this process: ``ratio = candidate / baseline``.

    The two are measured in alternating rounds (baseline, candidate, baseline, ...) so that load
    from other processes hits both alike; each round is a ``torch.utils.benchmark`` blocked
    autorange, and the reported time of each is the median over all the runs of all its rounds.
    A ratio below 1 means the candidate is faster.

    Args:
        baseline_fn: zero-argument callable, the reference.
        candidate_fn: zero-argument callable, what is measured against it.
        quick: fewer, shorter rounds (``python -m benchmarks --quick``).
        min_run_time: seconds per round and function (default 0.3, quick 0.1).
        rounds: number of alternating rounds (default 5, quick 2).
        num_threads: torch intra-op threads while timing.

    Returns:
        ``Timing`` ``{"baseline_s", "candidate_s", "ratio"}``.
    """
    if min_run_time is None:
        min_run_time = 0.1 if quick else 0.3
    if rounds is None:
        rounds = 2 if quick else 5
    baseline_fn()
    candidate_fn()
    times: dict[str, list[float]] = {"baseline": [], "candidate": []}
    for _ in range(rounds):
        for key, fn in (("baseline", baseline_fn), ("candidate", candidate_fn)):
            m = _timer(fn, num_threads).blocked_autorange(min_run_time=min_run_time)
            times[key].extend(m.times)
    base = _median(times["baseline"])
    cand = _median(times["candidate"])
    return Timing(baseline_s=base, candidate_s=cand, ratio=cand / base)


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def fit_exponent(sizes: Sequence[float], times: Sequence[float]) -> float:
    """Least-squares slope of ``log(time)`` against ``log(size)``: 1.0 is linear scaling.

    Examples:
        >>> round(fit_exponent([1e4, 1e5, 1e6], [1e-3, 1e-2, 1e-1]), 6)
        1.0
    """
    xs = [math.log(s) for s in sizes]
    ys = [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


# ------------------------------------------------------------------------------------- memory

_CHILD_FLAG = "--_peak_memory_child"


def peak_memory(target: str, kwargs: Mapping[str, Any] | None = None, *, device: str = "cpu",
                timeout: float = 600.0) -> int:
    """Peak extra memory (bytes) of one call, measured in a fresh Python process.

    ``target`` is ``"module:function"``. The child process imports the module, calls
    ``function(**kwargs)`` — the *setup*, not measured, which builds inputs and returns a
    zero-argument callable — calls that callable once to warm up, then measures a second call:

    - CPU: the rise of the resident set size (RSS) over its level before the call: the kernel's
      high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs`` just before the call,
      so ``peak = VmHWM - VmRSS(before)``. The child runs with fixed glibc malloc thresholds
      (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` = 64 KiB) so that freed tensors leave
      the RSS and the warm-up call's buffers are not silently reused. (``resource.getrusage`` cannot be reset and includes
      the setup; ``tracemalloc`` does not see torch's allocations.) Without ``clear_refs`` (old
      kernels, non-Linux) a 0.5 ms RSS sampler thread is used instead.
    - CUDA (``device="cuda"``): ``torch.cuda.max_memory_allocated() - memory_allocated()`` with
      the peak statistics reset before the call.

    A fresh process per configuration keeps allocator caches of earlier runs out of the figure.

    Args:
        target: ``"package.module:function"`` importable from the repository root.
        kwargs: JSON-serialisable keyword arguments of the setup function.
        device: ``"cpu"`` or ``"cuda"`` (what is measured; the setup places the tensors).
        timeout: seconds before the child is killed (raises ``RuntimeError``).

    Returns:
        The peak additional bytes of the measured call (>= 0).
    """
    spec = json.dumps({"target": target, "kwargs": dict(kwargs or {}), "device": device})
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    # A measuring instrument, not a tuning: glibc raises its mmap threshold after the first large
    # free, so the warm-up call's buffers would be recycled from the heap and never show in RSS
    # again; fixed thresholds keep every large tensor in its own mapping, returned to the OS on
    # free, so that RSS tracks live tensors. Only this child (which times nothing) runs with them.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks._util", _CHILD_FLAG, spec],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK_MEMORY ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"peak_memory({target!r}, {kwargs!r}) failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
        )
    return int(json.loads(lines[-1][len("PEAK_MEMORY "):])["peak_bytes"])


def memory_ratio(baseline: str | tuple[str, Mapping[str, Any]], candidate: str | tuple[str, Mapping[str, Any]],
                 *, device: str = "cpu") -> dict[str, float]:
    """Peak memory of ``candidate`` over ``baseline``, each from ``peak_memory``.

    Args:
        baseline: ``"module:function"`` or ``("module:function", kwargs)``.
        candidate: the same for the candidate.
        device: ``"cpu"`` or ``"cuda"``.

    Returns:
        ``{"baseline_bytes", "candidate_bytes", "ratio"}`` (ratio ``nan`` when the baseline used
        no measurable memory).
    """
    def _one(spec):
        target, kw = (spec, {}) if isinstance(spec, str) else spec
        return peak_memory(target, kw, device=device)

    b, c = _one(baseline), _one(candidate)
    return {"baseline_bytes": b, "candidate_bytes": c, "ratio": c / b if b > 0 else float("nan")}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _hwm_resettable() -> bool:
    """Whether writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM`` here (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _rss_kib("VmHWM") <= _rss_kib("VmRSS") + 1024
    except OSError:
        return False


def _measure_cpu(fn: Callable[[], Any]) -> int:
    gc.collect()
    if _hwm_resettable():
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # the high-water mark restarts from the current RSS
        fn()
        return max(0, _rss_kib("VmHWM") - before) * 1024
    # Fallback: sample RSS from a thread while fn runs.
    import resource

    def rss_bytes() -> int:
        try:
            return _rss_kib("VmRSS") * 1024
        except OSError:  # no /proc: ru_maxrss (kB on Linux, bytes on macOS), not resettable
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    before_b = rss_bytes()
    peak = [before_b]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        fn()
    finally:
        done.set()
        th.join()
    peak[0] = max(peak[0], rss_bytes())
    return max(0, peak[0] - before_b)


def _measure_cuda(fn: Callable[[], Any]) -> int:
    import torch

    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before)


def _child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    module, _, func = spec["target"].partition(":")
    setup = getattr(importlib.import_module(module), func)
    fn = setup(**spec["kwargs"])
    fn()  # warm-up: lazy initialisation and first-touch allocations are not the figure
    measure = _measure_cuda if spec["device"].startswith("cuda") else _measure_cpu
    peak = measure(fn)
    print("PEAK_MEMORY " + json.dumps({"peak_bytes": peak}), flush=True)


# ---------------------------------------------------------------------------------------- rows

_ROW_KEYS = ("name", "baseline", "candidate", "time_ratio", "memory_ratio", "target", "notes")


def row(name: str, baseline: str, candidate: str, timing: Timing | float | None = None,
        memory: Mapping[str, float] | float | None = None, *, target: str | None = None,
        notes: str = "", status: str | None = None) -> dict[str, Any]:
    """One result row ``{name, baseline, candidate, time_ratio, memory_ratio, target, notes}``.

    Args:
        name: what is measured (unique within the module).
        baseline: what the ratios divide by.
        candidate: what is measured against it.
        timing: a ``Timing`` (its absolute times are appended to ``notes``) or a bare ratio.
        memory: the dict of ``memory_ratio`` (bytes appended to ``notes``) or a bare ratio.
        target: ``"<= 1.15x"`` / ``">= 1x"`` on the time ratio, ``"mem <= 0.5x"`` on the memory
            ratio; the suite runner checks it (reported, never asserted). Free text otherwise.
        notes: free text.
        status: ``"ok"`` / ``"miss"`` when the module judges the target itself (e.g. a fitted
            exponent); otherwise the runner derives it from ``target``.

    Returns:
        The row dict (JSON-serialisable).

    Examples:
        >>> row("grpo", "bare loss", "grpo", 1.02, target="<= 1.05x")["time_ratio"]
        1.02
    """
    extra = []
    if isinstance(timing, Mapping):
        extra.append(f"{fmt_time(timing['baseline_s'])} -> {fmt_time(timing['candidate_s'])}")
        timing = timing["ratio"]
    if isinstance(memory, Mapping):
        extra.append(f"peak {fmt_bytes(memory['baseline_bytes'])} -> {fmt_bytes(memory['candidate_bytes'])}")
        memory = memory["ratio"]
    out: dict[str, Any] = {
        "name": name, "baseline": baseline, "candidate": candidate,
        "time_ratio": None if timing is None else float(timing),
        "memory_ratio": None if memory is None else float(memory),
        "target": target, "notes": "; ".join([n for n in [notes] + extra if n]),
    }
    if status is not None:
        out["status"] = status
    return out


def fmt_time(seconds: float) -> str:
    """``1.23 ms``-style rendering of a duration."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def fmt_bytes(n: float) -> str:
    """``12.3 MiB``-style rendering of a byte count."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == _CHILD_FLAG:
        _child(sys.argv[2])
    else:
        sys.exit("benchmarks._util is a helper module; run the suite with `python -m benchmarks`.")
