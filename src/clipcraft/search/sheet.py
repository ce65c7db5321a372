"""Result sheets: a PNG with the query (text or image) and its top-k images, each titled with rank and score."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from clipcraft.errors import ClipcraftError, ImageLoadError
from clipcraft.images import ImageInput, load_image


def result_sheet(
    query: str | ImageInput,
    results: Sequence[tuple[str, float]],
    out: str | os.PathLike[str],
    *,
    query_is_text: bool,
    columns: int = 5,
    thumb_inches: float = 2.2,
) -> Path:
    """Draw the query and its ranked ``(path, score)`` results on a grid and save it as PNG.

    The query fills the first cell (its text, wrapped, or its image); results follow in rank order, titled
    ``#rank  score``. Unreadable result files get an empty cell saying so. Needs matplotlib (imported here);
    a missing install raises :class:`ClipcraftError` naming ``pip install matplotlib``. Returns the path.
    """
    try:
        from matplotlib.figure import Figure  # the Figure API leaves pyplot's global state alone
    except ImportError:
        raise ClipcraftError(
            "Result sheets need matplotlib, which is not installed. Run `pip install matplotlib`."
        ) from None
    cells = 1 + len(results)
    cols = max(1, min(columns, cells))
    rows = math.ceil(cells / cols)
    fig = Figure(figsize=(cols * thumb_inches, rows * (thumb_inches + 0.35)), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    if query_is_text:
        axes[0].text(
            0.5,
            0.5,
            "\n".join(textwrap.wrap(str(query), 22)),
            ha="center",
            va="center",
            fontsize=11,
            wrap=True,
        )
        axes[0].set_title("query (text)", fontsize=9, fontweight="bold")
    else:
        axes[0].imshow(load_image(query))  # type: ignore[arg-type]
        axes[0].set_title("query (image)", fontsize=9, fontweight="bold")
    for rank, (path, score) in enumerate(results, start=1):
        ax = axes[rank]
        try:
            ax.imshow(load_image(path))
        except ImageLoadError:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=9)
        ax.set_title(f"#{rank}  {score:.3f}\n{Path(path).name[:28]}", fontsize=8)
    fig.tight_layout()
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png")
    return target
