"""Memory of the meta-gradient graph against unrolled steps and iterations.

The memory a meta-iteration holds until ``backward()`` is the tensors that
autograd saved for it; we count their storage bytes (deduplicated, live at
the moment ``backward()`` would start) with ``saved_tensors_hooks``. That is
exact and repeatable, unlike the process's resident size.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import psutil
import pytest
import torch
from problems import ours_meta_loss, sine_problem

STEPS = [1, 2, 4, 8, 16, 32]


def graph_bytes(problem, n_backprop_steps: int = 0) -> int:
    """Bytes of the live tensors saved for the backward of one meta-loss."""
    saved = []

    def pack(tensor):
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ours_meta_loss(problem, n_backprop_steps)
    gc.collect()
    storages = {}
    for ref in saved:
        tensor = ref()
        if tensor is not None:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    del loss
    return sum(storages.values())


def test_memory_grows_linearly_in_unrolled_steps(benchmark):
    full = [graph_bytes(sine_problem(16, k)) for k in STEPS]
    truncated = [graph_bytes(sine_problem(16, k), n_backprop_steps=1) for k in STEPS]
    slope, intercept = np.polyfit(STEPS, full, 1)
    fitted = slope * np.asarray(STEPS) + intercept
    r_squared = 1 - ((full - fitted) ** 2).sum() / ((full - np.mean(full)) ** 2).sum()
    assert r_squared > 0.999, f"graph memory is not linear in k: {full}"
    assert slope > 0
    # truncated to one step: the graph does not grow with k
    assert max(truncated) - min(truncated) < 0.02 * truncated[0], truncated
    benchmark.group = "memory"
    benchmark.extra_info.update(
        n_tasks=16,
        steps=STEPS,
        graph_bytes=full,
        truncated_graph_bytes=truncated,
        slope_bytes_per_step=float(slope),
        intercept_bytes=float(intercept),
        r_squared=float(r_squared),
    )
    benchmark.pedantic(graph_bytes, args=(sine_problem(16, 32),), rounds=1)


# gc.get_objects() touches torch.distributed's deprecated aliases
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_memory_does_not_grow_across_outer_iterations(benchmark):
    problem = sine_problem(16, 1)
    optimizer = torch.optim.Adam(problem.learned_loss.parameters(), lr=1e-3)
    process = psutil.Process()
    tensors, rss, graph = {}, {}, {}

    def iterate(n):
        for i in range(1, n + 1):
            optimizer.zero_grad()
            loss = ours_meta_loss(problem)
            loss.backward()
            optimizer.step()
            del loss
            if i in (10, n):
                gc.collect()
                tensors[i] = sum(torch.is_tensor(o) for o in gc.get_objects())
                rss[i] = process.memory_info().rss

    graph[0] = graph_bytes(problem)
    benchmark.group = "memory"
    benchmark.pedantic(iterate, args=(200,), rounds=1)
    graph[200] = graph_bytes(problem)
    # nothing accumulates: the same live tensors and graph after 10 and 200
    assert tensors[200] == tensors[10], tensors
    assert graph[200] == graph[0], graph
    benchmark.extra_info.update(
        live_tensors=tensors,
        rss_bytes=rss,
        graph_bytes_by_iteration=graph,
        rss_growth_bytes=rss[200] - rss[10],
    )
