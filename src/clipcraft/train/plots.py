"""Pictures of a run: loss, recall and temperature over training, and a retrieval example sheet."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np

from clipcraft.train.validation import RetrievalEmbeddings


def _pyplot():  # type: ignore[no-untyped-def]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plots written.")
        return None
    return plt


def training_plots(metrics_file: Path, out_dir: Path) -> list[Path]:
    """``training_curves.png``: training loss, validation recall and temperature against step."""
    plt = _pyplot()
    if plt is None or not metrics_file.is_file():
        return []
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("type") == "step"]
    epochs = [r for r in rows if r.get("type") == "epoch" and "recall_mean" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train")
    if epochs:
        axes[0].plot([r["step"] for r in epochs], [r["val_loss"] for r in epochs], "o-", label="validation")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    for key in ("i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "recall_mean"):
        if epochs:
            axes[1].plot([r["step"] for r in epochs], [r[key] for r in epochs], "o-", label=key)
    axes[1].set(title="validation recall", xlabel="step", ylim=(0, 1))
    if epochs:
        axes[1].legend()
    axes[2].plot([r["step"] for r in steps], [1.0 / r["logit_scale"] for r in steps])
    axes[2].set(title="temperature (1 / logit scale)", xlabel="step")
    fig.tight_layout()
    path = out_dir / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]


def retrieval_sheet(emb: RetrievalEmbeddings, path: Path, queries: int = 4, k: int = 5) -> Path | None:
    """A few captions (spread over the split) with their top-``k`` images; the right image framed green."""
    plt = _pyplot()
    if plt is None or len(emb.captions) == 0:
        return None
    from clipcraft.images import load_image

    picks = np.linspace(0, len(emb.captions) - 1, num=min(queries, len(emb.captions))).astype(int)
    fig, axes = plt.subplots(len(picks), k, figsize=(2.4 * k, 2.8 * len(picks)), squeeze=False)
    for row, t in enumerate(picks):
        scores = emb.images @ emb.texts[t]  # (N,)
        top = np.argsort(-scores, kind="stable")[:k]
        for col, i in enumerate(top):
            ax = axes[row][col]
            ax.imshow(load_image(emb.paths[i]))
            ax.set_xticks([])
            ax.set_yticks([])
            right = i == emb.text_to_image[t]
            for spine in ax.spines.values():
                spine.set(color="green" if right else "lightgray", linewidth=4 if right else 1)
            ax.set_title(f"{scores[i]:.2f}", fontsize=9)
        axes[row][0].set_ylabel(
            "\n".join(textwrap.wrap(emb.captions[t], 28)), fontsize=8, rotation=0, ha="right", va="center"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
