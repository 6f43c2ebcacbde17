"""Shared bench helpers: the JSON-line format and machine description."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import resource


def machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no gpu"
    except Exception:  # noqa: BLE001
        gpu = "no torch"
    return f"{os.cpu_count()} cpu, {platform.machine()}, {gpu}"


def emit(bench: str, metric: str, value: float, unit: str, baseline: str, baseline_value: float | None) -> dict:
    ratio = (value / baseline_value) if baseline_value else None
    line = {"bench": bench, "metric": metric, "value": round(value, 4), "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": None if ratio is None else round(ratio, 4),
            "machine": machine()}
    print(json.dumps(line), flush=True)
    return line


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its waited-for children). For the process itself, Linux's
    VmHWM: `ru_maxrss` survives exec, so a child spawned by a large parent would report the parent's size."""
    if not children:
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024.0


def guarded(target, args, queue, *extra) -> None:
    try:
        target(*args, queue, *extra)
    except BaseException:  # noqa: BLE001 - report the child's failure instead of hanging the parent
        import traceback

        queue.put({"error": traceback.format_exc()})


def in_child(target, *args):
    """Run in a fresh process (its own peak RSS); a failure in the child is raised here."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=guarded, args=(target, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if "error" in out:
        raise RuntimeError(out["error"])
    return out
