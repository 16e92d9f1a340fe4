"""Charts of evaluation results (matplotlib, from the `[eval]` extra; without it no PNG is written)."""

from __future__ import annotations

import json
import os
from typing import Sequence


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def perplexity_curves(result_files: Sequence[str], output_png: str, title: str = "") -> str | None:
    """Cumulative perplexity against context length (log x), one line per perplexity.json; None
    (nothing written) without matplotlib."""
    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path in result_files:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        if r.get("mode") == "prefix":
            xs = sorted(int(k) for k in r["prefix"])
            ys = [r["prefix"][str(x)]["perplexity"] for x in xs]
        else:
            xs = r["summary"]["edges"]
            ys = [r["summary"]["cumulative_perplexity"][str(x)] for x in xs]
        label = r.get("label") or os.path.basename(os.path.dirname(os.path.abspath(path))) or path
        ax.plot(xs, ys, marker="o", markersize=3, label=f"{label} ({r.get('mode', '?')})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity over the first N tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "perplexity vs context length")
    fig.tight_layout()
    fig.savefig(output_png, dpi=120)
    plt.close(fig)
    return output_png
