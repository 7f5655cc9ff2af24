"""Results of ``benchmark.py kernels``: JSON files, a text table with ratios, and a PNG plot."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def load(path: Path) -> dict:
    """Read a results JSON."""
    return json.loads(Path(path).read_text())


def _index(result: dict) -> dict:
    return {(r["impl"], r["page"], r["batch"], r["context"]): r for r in result["rows"]}


def summary(result: dict, ours: str = "llmir") -> list[dict]:
    """One row per (batch, context, page): our bandwidth, fraction of peak and time ratios."""
    idx = _index(result)
    others = sorted({r["impl"] for r in result["rows"]} - {ours})
    out = []
    for (impl, page, batch, ctx), r in sorted(idx.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][1])):
        if impl != ours:
            continue
        row = {"batch": batch, "context": ctx, "page": page, "us": r["seconds"] * 1e6}
        if result.get("device_kind") == "cpu":
            row["GB/s"] = r["bandwidth"] / 1e9
        else:
            row.update({"TB/s": r["bandwidth"] / 1e12, "peak": r.get("fraction_of_peak")})
        for other in others:
            o = idx.get((other, page, batch, ctx))
            if o is not None:
                row[f"x{other}"] = o["seconds"] / r["seconds"]  # >1: ours is faster
        out.append(row)
    return out


def page_spread(result: dict, ours: str = "llmir") -> dict:
    """(batch, context) -> (max - min) / min of our time over the page sizes."""
    times = defaultdict(list)
    for r in result["rows"]:
        if r["impl"] == ours:
            times[(r["batch"], r["context"])].append(r["seconds"])
    return {k: (max(v) - min(v)) / min(v) for k, v in times.items() if len(v) > 1}


def table(result: dict) -> str:
    """Plain-text table: per config our time, bandwidth, fraction of peak, speed-up vs the others."""
    rows = summary(result)
    if not rows:
        return "(no results)"
    keys = list(rows[0])
    lines = [f"device: {result.get('device')}  date: {result.get('date')}", "  ".join(f"{k:>12s}" for k in keys)]
    for row in rows:
        cells = []
        for k in keys:
            v = row.get(k)
            if isinstance(v, float):
                cells.append(f"{v:12.1%}" if k == "peak" else f"{v:12.3f}")
            else:
                cells.append(f"{v!s:>12s}")
        lines.append("  ".join(cells))
    spread = page_spread(result)
    if spread:
        lines.append("page-size spread (max-min)/min: " + ", ".join(f"b{b} ctx{c}: {s:.1%}" for (b, c), s in sorted(spread.items())))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Bandwidth (and fraction of peak) of every implementation per (batch, context), one panel per page size."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    pages = sorted({r["page"] for r in result["rows"]})
    impls = sorted({r["impl"] for r in result["rows"] if ":" not in r["impl"]})
    configs = sorted({(r["batch"], r["context"]) for r in result["rows"]})
    idx = _index(result)
    fig, axes = plt.subplots(1, len(pages), figsize=(5.5 * len(pages), 4.2), sharey=True, squeeze=False)
    width = 0.8 / max(len(impls), 1)
    peak = result.get("peak_hbm_bytes_per_s")
    for ax, page in zip(axes[0], pages):
        for i, impl in enumerate(impls):
            ys = [idx[(impl, page, b, c)]["bandwidth"] / 1e12 if (impl, page, b, c) in idx else 0.0 for b, c in configs]
            ax.bar([x + i * width for x in range(len(configs))], ys, width, label=impl)
        if peak and peak == peak:
            ax.axhline(peak / 1e12, color="k", linestyle="--", linewidth=1, label="peak HBM")
            ax.axhline(0.85 * peak / 1e12, color="gray", linestyle=":", linewidth=1, label="85% of peak")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(configs))])
        ax.set_xticklabels([f"b{b}\n{c}" for b, c in configs], fontsize=8)
        ax.set_title(f"page size {page}")
        ax.set_xlabel("batch / context")
    axes[0][0].set_ylabel("K/V read bandwidth (TB/s)")
    axes[0][-1].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"paged decode attention, {result.get('device')} ({result.get('date')})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
