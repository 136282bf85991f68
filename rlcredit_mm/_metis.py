"""METIS partitions of many small graphs at once, in worker processes.

``anchor_clusters`` cuts one kNN graph per response with METIS, a host algorithm. pymetis holds
the GIL for the whole of each call, so threads cannot run the calls side by side nor let the main
thread queue GPU work meanwhile: one call per response, in a loop, is tens of milliseconds per
response during which the GPU idles. ``partition_all`` instead hands all of a batch's graphs to a
pool of worker processes (forked, so they start in milliseconds and import nothing; they only run
numpy and pymetis) and waits once: B responses take about ``B / workers`` calls' time. The
partition of a graph does not depend on which process computes it (METIS is deterministic given
the graph and the seed), so the result is the same as the sequential loop's, which remains the
path where no pool can be used (one CPU, a non-Linux platform, a daemonic process, one graph).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

__all__: list[str] = []

#: At most this many worker processes (fewer when fewer CPUs are available to this process).
MAX_WORKERS = 8

_pool: tuple[int, ProcessPoolExecutor, int] | None = None  # (creating pid, pool, workers): a forked child makes its own

Job = tuple[int, int, "np.ndarray | None", int]  # (n nodes, n_parts, neighbours [n, k] (-1: none) or None, seed)


def partition(job: Job) -> np.ndarray:
    """METIS labels ``[n]`` (int64) of one response's token graph.

    Nodes are the response's ``n`` valid tokens; edges link consecutive tokens and each token to its
    listed neighbours (``-1``: none), symmetrised, without duplicates. Recursive bisection into
    ``n_parts`` balanced parts (several times faster than k-way at hundreds of parts); a graph with
    ``n <= n_parts`` nodes gets one part per node.
    """
    import pymetis

    n, n_parts, nbr, seed = job
    if n <= n_parts:
        return np.arange(n, dtype=np.int64)
    src, dst = [np.arange(n - 1)], [np.arange(1, n)]  # neighbour edges
    if nbr is not None:
        keep = nbr >= 0
        src.append(np.repeat(np.arange(n), nbr.shape[1]).reshape(n, -1)[keep])
        dst.append(nbr[keep])
    src_all, dst_all = np.concatenate(src), np.concatenate(dst)
    # symmetrise and drop duplicates: METIS wants each undirected edge listed once from each end
    pairs = np.unique(np.concatenate([src_all * n + dst_all, dst_all * n + src_all]))
    xadj = np.searchsorted(pairs // n, np.arange(n + 1)).astype(np.int64)
    adjncy = (pairs % n).astype(np.int64)
    csr = getattr(pymetis, "CSRAdjacency", None)
    graph = {"adjacency": csr(xadj, adjncy)} if csr is not None else {"xadj": xadj, "adjncy": adjncy}
    part = pymetis.part_graph(n_parts, **graph, options=pymetis.Options(seed=seed), recursive=True).vertex_part
    return np.asarray(part, dtype=np.int64)


def _cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def executor() -> tuple[ProcessPoolExecutor, int] | None:
    """``(pool, workers)`` (created on first use, per process), or None where the loop runs inline."""
    global _pool
    workers = min(_cpus(), MAX_WORKERS)
    if workers < 2 or not sys.platform.startswith("linux") or multiprocessing.current_process().daemon:
        return None
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")), workers)
    return _pool[1], _pool[2]


def partition_all(jobs: list[Job]) -> list[np.ndarray]:
    """``[partition(job) for job in jobs]``, the jobs spread over the worker pool when there is one."""
    found = executor() if len(jobs) > 1 else None
    if found is None:
        return [partition(job) for job in jobs]
    pool, workers = found
    try:
        # A few jobs per message: fewer round trips, still balanced across the workers.
        return list(pool.map(partition, jobs, chunksize=max(1, math.ceil(len(jobs) / (4 * workers)))))
    except BrokenProcessPool:  # a worker died (e.g. killed for memory): drop the pool, run inline
        global _pool
        _pool = None
        return [partition(job) for job in jobs]
