"""Result sheets: a PNG with the query (text or image) and its top-k images, each titled with rank and score."""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from clipcraft.errors import ClipcraftError, ImageLoadError
from clipcraft.images import ImageInput, load_image

# A sheet draws at most this many results (as thumbnails): 100 cells of 2.2 inches at 100 dpi is a
# 1,100 x 5,000 pixel PNG; more is neither viewable nor quick to draw.
MAX_SHEET_RESULTS = 100
THUMB_PIXELS = 200  # longest side of each result's thumbnail


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
    ``#rank  score``, as thumbnails; at most :data:`MAX_SHEET_RESULTS` of them (the caller says so when it
    passes more). Unreadable result files get an empty cell saying so. The parent folder must exist (the
    command line creates it and says so). Needs matplotlib (imported here); a missing install raises
    :class:`ClipcraftError` naming ``pip install matplotlib``. Returns the path.
    """
    results = list(results)[:MAX_SHEET_RESULTS]
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
        axes[0].imshow(_thumbnail(query))
        axes[0].set_title("query (image)", fontsize=9, fontweight="bold")
    for rank, (path, score) in enumerate(results, start=1):
        ax = axes[rank]
        try:
            ax.imshow(_thumbnail(path))
        except ImageLoadError:
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", fontsize=9)
        ax.set_title(f"#{rank}  {score:.3f}\n{Path(path).name[:28]}", fontsize=8)
    fig.tight_layout()
    target = Path(out)
    if not target.parent.is_dir():
        raise ClipcraftError(
            f"The folder {target.parent} does not exist; create it or choose another --grid path."
        )
    fig.savefig(target, format="png")
    return target


def _thumbnail(image: ImageInput) -> object:
    """The image shrunk to :data:`THUMB_PIXELS` on its longest side (a sheet cell is that size anyway)."""
    picture = load_image(image)
    picture.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
    return picture
