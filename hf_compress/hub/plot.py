"""The card's plot (``hf_compress_layers.png``): rank or bits per weight of every compressed layer by block, and the
size breakdown dense vs compressed. matplotlib is optional (``pip install 'hf-compress[hub]'``): without it the
card has no plot."""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict

from torch import nn

from ..modules import compressed_modules
from ..summary import layer_table, layer_type, size_breakdown

logger = logging.getLogger(__name__)

PLOT_FILE = "hf_compress_layers.png"


def _block_index(name: str) -> int | None:
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m[1]) if m else None


def plot_layers(model: nn.Module, path: str | os.PathLike) -> bool:
    """PNG: rank (low-rank models) or bits per weight of every compressed layer by block, per layer type, and the
    size breakdown dense vs compressed. Returns False (and writes nothing) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'hf-compress[hub]'): the card has no plot.")
        return False
    config = model.config.quantization_config
    use_rank = config.family == "lowrank" and not config.bits
    modules = compressed_modules(model)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
    series: OrderedDict[str, dict] = OrderedDict()
    for i, r in enumerate(x for x in layer_table(model) if x.kind != "dense"):
        y = modules[r.name].rank if use_rank else r.bits_per_weight
        b = _block_index(r.name)
        series.setdefault(layer_type(r.name), {})[i if b is None else b] = y
    xs = sorted({x for pts in series.values() for x in pts})
    for kind, pts in series.items():  # NaN where a block's layer stayed dense: the line breaks there
        ax.plot(xs, [pts.get(x, float("nan")) for x in xs], marker="o", ms=3, lw=1, label=kind)
    ax.set_xlabel("block")
    ax.set_ylabel("rank" if use_rank else "bits per weight")
    ax.set_title(("rank" if use_rank else "bits per weight") + " of each compressed layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    s = size_breakdown(model)
    mib = 2**20
    parts = [("compressed layers", s["compressed_dense"], s["compressed_now"]),
             ("dense linear layers", s["other_linear"], s["other_linear"]),
             ("other tensors (embeddings, norms, ...)", s["other"], s["other"])]
    left = [0.0, 0.0]
    for label, dense_b, now_b in parts:
        vals = [dense_b / mib, now_b / mib]
        bx.barh(["dense", "compressed"], vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals)]
    bx.set_xlabel("MiB")
    bx.set_title("model size")
    bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
