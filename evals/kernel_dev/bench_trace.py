"""The benchmark's trace arithmetic: per-call GPU time from a torch.profiler chrome trace whose calls are separated
by spin kernels (`bench_mamba3.profile_kernel_ms` records it), and the GPU's idle time inside a call. Pure functions on
the trace's JSON (no torch), tested on synthetic traces in tests/test_bench.py."""

from __future__ import annotations

import statistics


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None



def busy_and_idle_us(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(busy, idle) microseconds of one call's device events (start, duration): busy = the union of the intervals
    (overlapping kernels count once), idle = the rest of the span from the first start to the last end. Idle inside a
    call is time the GPU waited for the host's next launch: what makes wall time exceed GPU time."""
    if not intervals:
        return 0.0, 0.0
    spans = sorted(intervals)
    first = start = spans[0][0]
    busy, end = 0.0, start
    for ts, dur in spans:
        if ts > end:  # a new stretch of work: close the one before
            busy += end - start
            start = ts
        end = max(end, ts + dur)
    busy += end - start
    return busy, (end - first) - busy


def split_trace(trace: dict, reps: int) -> dict:
    """Per-call device time from a chrome trace whose calls are separated by spin kernels: the kernels' summed time,
    their count, the GPU idle between a call's first and last kernel (`busy_and_idle_us`), the costliest kernels."""
    evs = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"
           and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    evs.sort(key=lambda e: float(e["ts"]))
    groups, names = [[]], {}
    for e in evs:
        if "spin_kernel" in e.get("name", ""):
            groups.append([])
            continue
        groups[-1].append((float(e["ts"]), float(e["dur"])))
        key = e.get("name", "?")[:90]
        names[key] = names.get(key, 0.0) + float(e["dur"])
    total_us = sum(d for g in groups for _, d in g)
    idle = None
    if len(groups) == reps + 1 and not groups[-1] and all(groups[:reps]):
        per = [sum(d for _, d in g) / 1000 for g in groups[:reps]]
        launches = median([len(g) for g in groups[:reps]])
        idle = median([busy_and_idle_us(g)[1] / 1000 for g in groups[:reps]])
        how = "per-call split"
    else:
        per = [total_us / 1000 / max(reps, 1)]
        launches = sum(len(g) for g in groups) / max(reps, 1)
        how = f"mean (split failed: {len(groups)} groups for {reps} calls)"
    top = sorted(names.items(), key=lambda kv: -kv[1])[:8]
    return dict(gpu_ms=median(per), gpu_ms_all=[round(x, 5) for x in per], launches_per_call=launches,
                gpu_idle_ms=idle, gpu_split=how,
                top_kernels=[dict(name=n, ms_per_call=round(us / 1000 / max(reps, 1), 5)) for n, us in top])

