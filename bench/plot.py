"""Figures of the benchmark results: ``bench/results/results.csv`` (the runner's table) and ``*.json`` in, PNGs out
(matplotlib, Agg, no display).

    python -m bench.plot [--results bench/results] [--out bench/results]

``results.csv`` (its latest run per device) -> ``ops_<device>.png`` (per op: time and GFLOP/s vs E for each
backend, the CPU's measured FMA peak) and ``train_<device>.png`` (the same for the layers' training step),
``e2e_cpu.json`` -> ``e2e_cpu.png`` (per model: wall time and peak RSS of each implementation,
ratios vs the official one) and ``scale_cpu.json`` -> ``scale_cpu.png`` (step time and peak RSS vs edges). A
missing or unreadable results file skips its figure with a one-line message.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

RESULTS = Path(__file__).resolve().parent / "results"
COLORS = {"ours": "C0", "pyg": "C1", "reference": "C2", "compiled": "C3", "layerwise": "C4", "official": "C1"}
OPS = ("film_mean", "edge_mlp", "edge_film_mean", "segment_mean")
LAYERS = ("train_film", "train_edge", "train_fused")
GIB = 2**30
ANNOTATE = dict(textcoords="offset points", ha="center", va="bottom", fontsize=8, fontweight="bold")


def _figure(ncols: int, nrows: int = 1, w: float = 4.2, h: float = 3.4) -> tuple[Figure, list]:
    fig = Figure(figsize=(w * ncols, h * nrows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _log_y(ax) -> None:
    """Log y axis, plain-number labels at 1-2-5 ticks (decades only past 3 decades), spanning at least 8x."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if hi / lo < 8:
        mid = math.sqrt(lo * hi)
        lo, hi = mid / 8**0.5, mid * 8**0.5
        ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5) if hi / lo < 1e3 else (1,)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _caption(data: dict) -> str:
    """One line describing the machine (and torch) the results were taken on; '' if unknown."""
    m = data.get("machine") or {}
    parts = [m.get("cpu"), m.get("gpu")]
    parts += [f"{m[k]} {k}" for k in ("cores", "threads") if m.get(k) is not None]
    parts += [f"torch {m['torch']}" if m.get("torch") else None]
    return ", ".join(str(p) for p in parts if p)


def _save(fig: Figure, data: dict, path: Path) -> Path:
    caption = _caption(data)
    fig.tight_layout(rect=(0, 0.035 if caption else 0, 1, 1))
    if caption:
        fig.text(0.005, 0.005, f"machine: {caption}", fontsize=7, color="0.35", ha="left", va="bottom")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path


def _order(names: list[str], preferred: tuple[str, ...]) -> list[str]:
    return [n for n in preferred if n in names] + sorted(n for n in set(names) if n not in preferred)


def plot_ops(data: dict, path: Path) -> Path:
    """Per op (columns): median time (ms) vs E, then achieved GFLOP/s vs E, one line per implementation."""
    rows = [r for r in data["rows"] if r.get("median_s") and r.get("edges")]
    device, backend = data.get("device") or path.stem.split("_")[-1], data.get("backend")
    ops = _order([r.get("op", "?") for r in rows], OPS + LAYERS)
    impls = _order([r.get("impl", "?") for r in rows], ("ours", "pyg", "reference", "compiled"))
    peak = data.get("fma_peak_gflops")
    fig, axes = _figure(max(len(ops), 1), 2)
    for j, op in enumerate(ops):
        t_ax, g_ax = axes[j], axes[len(ops) + j]
        for impl in impls:
            sel = sorted((r for r in rows if r.get("op") == op and r.get("impl") == impl), key=lambda r: r["edges"])
            if not sel:
                continue
            e = [r["edges"] for r in sel]
            style = dict(marker="o", color=COLORS.get(impl), label=impl)
            t_ax.plot(e, [r["median_s"] * 1e3 for r in sel], **style)
            if all("min_s" in r and "max_s" in r for r in sel):
                lo, hi = [r["min_s"] * 1e3 for r in sel], [r["max_s"] * 1e3 for r in sel]
                t_ax.fill_between(e, lo, hi, color=COLORS.get(impl), alpha=0.2, lw=0)
            g = [(r["edges"], r["gflops"]) for r in sel if r.get("gflops") is not None]
            if g:
                g_ax.plot(*zip(*g, strict=True), **style)
        if peak:  # the CPU's measured FMA peak (none on CUDA): dashed lines, read off a right-hand % axis
            for frac, color in ((1, "k"), (0.5, "0.45")):
                g_ax.axhline(frac * peak, ls="--", color=color, lw=1)
            to_pct = (lambda y, p=peak: 100 * y / p, lambda q, p=peak: q * p / 100)
            pct = g_ax.secondary_yaxis("right", functions=to_pct)
            pct.set_yticks([0, 50, 100], ["0%", "50%", "100%"])
            pct.set_ylabel(f"% of FMA peak ({peak:.0f} GFLOP/s)", fontsize=8)
        t_ax.set(xscale="log", title=f"{op}: time per call", ylabel="median time (ms)")
        _log_y(t_ax)
        g_ax.set(xscale="log", title=f"{op}: achieved throughput", ylabel="achieved GFLOP/s", xlabel="edges E")
        top = max([peak or 0] + [r.get("gflops") or 0 for r in rows if r.get("op") == op])
        g_ax.set_ylim(0, 1.12 * top if top else None)
        t_ax.set_xlabel("edges E")
        t_ax.legend(fontsize=8)  # colours as in the throughput panel below (its legend would hide the peak line)
        for ax in (t_ax, g_ax):
            ax.grid(True, which="both", alpha=0.3)
    ours = f", ours: {backend} backend" if backend and backend != device else ""
    what = data.get("title", "NiNo message-passing ops")
    fig.suptitle(f"{what} on {device.upper()}{ours} (median of repeats; band: min to max)")
    return _save(fig, data, path)


def _ratio_text(official: float, ours: float, better: str, worse: str) -> str:
    r = official / ours
    return f"{r:.1f}×\n{better}" if r >= 1 else f"{1 / r:.1f}×\n{worse}"


def plot_e2e(data: dict, path: Path) -> Path:
    """Per model: grouped bars of total wall time (s, log) and peak RSS (GiB), ours annotated vs official."""
    rows = [r for r in data["rows"] if r.get("model") and r.get("impl")]
    models = list(dict.fromkeys(r["model"] for r in rows))
    impls = _order([r["impl"] for r in rows], ("ours", "layerwise", "official"))
    by = {(r["model"], r["impl"]): r for r in rows}
    fig, (t_ax, m_ax) = _figure(2, w=5.2, h=4.2)
    width = 0.8 / max(len(impls), 1)
    panels = (
        (t_ax, "total_s", 1.0, "faster", "slower", "total wall time (s)"),
        (m_ax, "peak_rss_bytes", GIB, "less RSS", "more RSS", "peak RSS (GiB)"),
    )
    for ax, key, scale, better, worse, label in panels:
        for i, impl in enumerate(impls):
            sel = [(x, m) for x, m in enumerate(models) if by.get((m, impl), {}).get(key) is not None]
            if not sel:
                continue
            xs = [x + (i - (len(impls) - 1) / 2) * width for x, _ in sel]
            bars = ax.bar(xs, [by[(m, impl)][key] / scale for _, m in sel], width, label=impl, color=COLORS.get(impl))
            for bar, (_, model) in zip(bars, sel, strict=True):
                off = by.get((model, "official"), {}).get(key) if impl == "ours" else None
                if off:
                    text = _ratio_text(off / scale, bar.get_height(), better, worse)
                    top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
                    ax.annotate(text, top, xytext=(0, 3), **ANNOTATE)
        if not ax.patches:
            ax.text(0.5, 0.5, f"no {key} in the results", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_xticks(range(len(models)), models)
        ax.set_xlim(-0.5, max(len(models), 1) - 0.5)
        ax.set(ylabel=label, xlabel="model", title=label.split(" (")[0] + " per model")
        ax.margins(y=0.3)  # headroom for the ratios and the one-row legend
        if key == "total_s":
            _log_y(ax)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        if ax.patches:
            ax.legend(fontsize=8, loc="upper left", ncols=max(len(impls), 1))
    k = f" (k={data['k']})" if data.get("k") is not None else ""
    note = "; ratios: ours vs official" if "official" in impls else ""
    fig.suptitle(f"End-to-end NiNo step on CPU{k}: graph + nowcast{note}")
    return _save(fig, data, path)


def plot_scale(data: dict, path: Path) -> Path:
    """Step time (s) and peak RSS (GiB) vs number of edges, one series per ``max_memory`` budget."""
    rows = sorted((r for r in data["rows"] if r.get("edges")), key=lambda r: r["edges"])
    budgets = list(dict.fromkeys(r.get("max_memory") for r in rows))
    fig, (t_ax, m_ax) = _figure(2, w=5.2, h=4.2)
    panels = ((t_ax, "step_s", 1.0, "step wall time (s)"), (m_ax, "peak_rss_bytes", GIB, "process peak RSS (GiB)"))
    for ax, key, scale, label in panels:
        for i, budget in enumerate(budgets):
            sel = [r for r in rows if r.get("max_memory") == budget and r.get(key) is not None]
            if not sel:
                continue
            name = f"max_memory={budget}" if budget else "default max_memory"
            x, y = [r["edges"] for r in sel], [r[key] / scale for r in sel]
            ls = "-" if len(sel) > 1 else "none"
            ax.plot(x, y, marker="os^vD"[i % 5], ls=ls, label=name, color=f"C{i}")
        base = [r for r in rows if r.get("max_memory") is None and r.get(key) is not None]
        if key == "step_s" and len(base) > 1:  # linear-scaling guide through the smallest default run
            e0, v0 = base[0]["edges"], base[0][key]
            ax.plot([e0, base[-1]["edges"]], [v0, v0 * base[-1]["edges"] / e0], ls=":", color="0.5", label="∝ E")
        for r in base:
            params = f"\n{r['params'] / 1e6:.1f}M params" if r.get("params") else ""
            xy = (r["edges"], r[key] / scale)
            text = f"{r.get('model', '')}{params}"
            ax.annotate(text, xy, xytext=(6, -4), textcoords="offset points", fontsize=7, va="top")
        ax.set(xscale="log", xlabel="graph edges E (≈ parameters)", ylabel=label)
        ax.set_title(label.split(" (")[0] + " vs graph size")
        ax.margins(x=0.25, y=0.2)
        _log_y(ax)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    k = f" (k={data['k']})" if data.get("k") is not None else ""
    fig.suptitle(f"NiNo step at scale on CPU{k}: Llama graphs, streamed plan")
    return _save(fig, data, path)


def _load(path: Path) -> dict | None:
    """The results file as a dict with a list of rows, or None (and a one-line message) if missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data, why = None, "not found"
    except (OSError, ValueError) as exc:  # e.g. half-written by a running benchmark
        data, why = None, f"unreadable ({exc})"
    else:
        why = "" if isinstance(data, dict) and isinstance(data.get("rows"), list) else "has no list of rows"
    if why:
        print(f"skip {path.with_suffix('.png').name}: {path} {why}")
        return None
    return data


def _from_table(path: Path) -> dict[str, dict]:
    """The latest run per device of the runner's CSV table as ``{"ops_<device>": data, "train_<device>": data}``
    (data as plot_ops reads it); {} (and a one-line message) if the table is missing or unreadable."""
    try:
        with path.open(newline="") as f:
            table = list(csv.DictReader(f))
        for r in table:
            for k in ("edges", "median_ms", "min_ms", "max_ms", "gflops"):
                r[k] = float(r[k])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"skip ops_*.png, train_*.png: {path} {'not found' if isinstance(exc, FileNotFoundError) else exc}")
        return {}
    out = {}
    for device in sorted({r["device"] for r in table}):
        latest = max(r["run"] for r in table if r["device"] == device)
        sel = [r for r in table if r["device"] == device and r["run"] == latest]
        r0 = sel[0]
        machine = {"cpu": r0["machine"], "cores": r0["cores"], "threads": r0["threads"], "torch": r0["torch"]}
        peak = float(r0["peak_gflops"]) if r0.get("peak_gflops") else None
        ours = next((r["backend"] for r in sel if r["backend"] in ("cpu", "cuda", "triton")), None)
        for name, ops, title in (("ops", OPS, "NiNo message-passing ops"), ("train", LAYERS, "Layers' training step")):
            rows = [
                dict(op=r["op"], impl="ours" if r["backend"] == ours else r["backend"], edges=r["edges"],
                     median_s=r["median_ms"] / 1e3, min_s=r["min_ms"] / 1e3, max_s=r["max_ms"] / 1e3,
                     gflops=r["gflops"])
                for r in sel if r["op"] in ops
            ]  # fmt: skip
            if rows:
                data = dict(machine=machine, fma_peak_gflops=peak, backend=ours, device=device, title=title)
                out[f"{name}_{device}"] = dict(data, rows=rows)
    return out


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the results JSON files")
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the --results folder)")
    args = p.parse_args(argv)
    out = args.out or args.results
    written = []
    for name, data in _from_table(args.results / "results.csv").items():
        written.append(plot_ops(data, out / f"{name}.png"))
        print(f"wrote {written[-1]}")
    jobs = [("e2e_cpu", plot_e2e), ("scale_cpu", plot_scale)]
    for name, plot in jobs:
        data = _load(args.results / f"{name}.json")
        if data is not None:
            written.append(plot(data, out / f"{name}.png"))
            print(f"wrote {written[-1]}")
    return written


if __name__ == "__main__":
    main()
