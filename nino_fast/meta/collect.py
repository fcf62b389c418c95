"""``nino-fast collect``: train the plan's small models and store their parameter trajectories.

    nino-fast collect --out DIR [--plan default|wide] [--families mlp convnet ...] [--budget-min 12]
                      [--max-runs N] [--steps 2400] [--save-every 20]

Runs the tasks of a plan (:func:`nino_fast.meta.tasks.make_plan`; ``default``: ConvNets and MLPs, ``wide``:
more MLPs, lower learning rates and the character-level GPT-2 / Llama transformers) in order, skipping those
already in the store (resumable: rerun the same command after an interruption; the run in progress is redone).
Prints the disk the whole plan would take before starting, and stops starting new runs once ``--budget-min``
minutes of this process's CPU time have been used (CPU time, not wall time: on a shared machine the wall clock
says little). One thread (``torch.set_num_threads``): the models are tiny and the machine is shared.
"""

from __future__ import annotations

import math
import time

from .._env import torch_threads
from . import tasks
from .store import TrajectoryStore


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def collect(
    out,
    plan: list[dict] | None = None,
    budget_min: float | None = None,
    max_runs: int | None = None,
    dtype: str = "float16",
    threads: int = 1,
    log=print,
) -> dict:
    """Collect ``plan`` (default: the default plan) into the store at ``out`` with ``threads`` torch threads (the
    caller's count is restored after); returns a summary dict."""
    with torch_threads(threads):
        return _collect(out, plan, budget_min, max_runs, dtype, log)


def _check_same_runs(store: TrajectoryStore, plan: list[dict], out) -> None:
    """A run the store holds already must be the one the plan asks for (its id does not say how long it ran or
    how often it was saved): a store is continued, never silently mixed."""
    for spec in plan:
        kept = store.runs.get(tasks.task_id(spec), {}).get("spec", {})
        changed = [k for k in ("steps", "save_every") if k in kept and kept[k] != spec[k]]
        if changed:
            said = ", ".join(f"{k}={kept[k]} (now {spec[k]})" for k in changed)
            raise ValueError(f"collect: {out} holds run {tasks.task_id(spec)} with {said}; use another --out")


def _collect(out, plan, budget_min, max_runs, dtype, log) -> dict:
    plan = tasks.default_plan() if plan is None else plan
    tasks.check_plan(plan)
    if max_runs is not None:
        plan = plan[:max_runs]
    store = TrajectoryStore(out, dtype)
    _check_same_runs(store, plan, out)
    sizes = {}
    for spec in plan:
        n_params = sum(math.prod(s) for _, s in tasks.named_shapes(spec))
        sizes[tasks.task_id(spec)] = (spec["steps"] // spec["save_every"] + 1, n_params)
    total = sum(store.bytes_for(*v) for v in sizes.values())
    todo = [s for s in plan if not store.has(tasks.task_id(s))]
    log(
        f"collect: {len(plan)} runs planned, disk for all of them {_mib(total)} ({store.dtype}); "
        f"{len(plan) - len(todo)} already in {out}, {len(todo)} to do"
        + (f", time budget {budget_min:g} min" if budget_min else "")
    )
    t0, c0, done = time.perf_counter(), time.process_time(), 0
    for spec in todo:
        if budget_min is not None and time.process_time() - c0 > 60 * budget_min:
            log(f"collect: time budget reached after {done} runs; rerun to continue")
            break
        rid = tasks.task_id(spec)
        n_states, n_params = sizes[rid]
        writer = store.writer(rid, n_states, n_params)
        losses: list[float] = []

        def on_snapshot(i, flat, val, writer=writer, losses=losses):
            writer.write(i, flat)
            losses.append(round(val, 5))

        try:
            c1 = time.process_time()
            res = tasks.run_task(spec, on_snapshot, tasks.load_data(spec))
        except BaseException:
            writer.abort()
            raise
        entry = dict(
            spec=spec,
            param_shapes=[[n, list(s)] for n, s in tasks.named_shapes(spec)],
            save_every=spec["save_every"],
            val_loss=losses,
            seconds=round(res["seconds"], 2),
            cpu_seconds=round(time.process_time() - c1, 2),
            diverged=res["diverged"],
        )
        if tasks.graph_args(spec):
            entry["graph_args"] = tasks.graph_args(spec)  # build_graph's arch / heads (also derived from spec)
        if "data" in res:
            entry["data"] = res["data"]
        writer.commit(entry)
        done += 1
        log(
            f"  [{len(plan) - len(todo) + done}/{len(plan)}] {rid}: {n_params} params, {writer.rows} states, val loss "
            f"{losses[0]:.3f} -> {losses[-1]:.3f}{' DIVERGED' if res['diverged'] else ''}, {res['seconds']:.1f}s"
        )
    summary = dict(
        runs=len(store.runs),
        new_runs=done,
        seconds=round(time.perf_counter() - t0, 1),
        cpu_seconds=round(time.process_time() - c0, 1),
        disk_bytes=store.disk_bytes(),
        out=str(out),
    )
    log(
        f"collect: {summary['runs']} runs in the store ({_mib(summary['disk_bytes'])}), {done} new in "
        f"{summary['seconds']}s ({summary['cpu_seconds']}s CPU)"
    )
    return summary
