"""PNG plots of an analysis report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omnikv.errors import ConfigError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers / CI
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'omnikv[plot]'") from None
    return plt


def plot_heatmap(report: dict[str, Any], key: str, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of one coverage matrix: row = selecting layer i, column = attending layer j."""
    plt = _pyplot()
    entry = report["coverage"][key]
    layers = report["layer_ids"]
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(entry["matrix"], vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
    step = max(1, len(layers) // 15)
    ticks = list(range(0, len(layers), step))
    ax.set_xticks(ticks, [layers[t] for t in ticks])
    ax.set_yticks(ticks, [layers[t] for t in ticks])
    ax.set_xlabel("attending layer j")
    ax.set_ylabel("selecting layer i (its top-k)")
    ax.set_title(title or f"{report.get('model', '')} coverage {key}", fontsize=10)
    fig.colorbar(im, ax=ax, label="share of layer j's attention mass")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_decay(report: dict[str, Any], keys: list[str], path: str | Path, title: str | None = None) -> Path:
    """Mean coverage of layer i + d by layer i against the distance d, one line per variant."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in keys:
        decay = report["coverage"][key]["decay"]
        ax.plot(range(len(decay)), decay, marker=".", label=key)
    ax.set_xlabel("layer distance d (d = 0: own top-k)")
    ax.set_ylabel("mean coverage of layer i+d by layer i")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or f"{report.get('model', '')} coverage decay", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
