"""Image-text retrieval metrics by the standard multi-caption protocol (Flickr8k/30k, COCO).

Every caption belongs to exactly one image (``text_to_image[j]`` is the image of caption ``j``); an image may
have several captions and must have at least one.

* **Image → text**: an image queries all captions. Its rank is the rank of its best-placed caption; a hit at
  ``k`` means at least one of its captions is in the top ``k``.
* **Text → image**: a caption queries all images. Its rank is the rank of its own image.

Ranks are 1-based. **Ties are counted against the query** (pessimistic): a wrong item whose score equals the
score of the right item is ranked before it. Put differently, rank = 1 + the number of wrong items scoring
``>=`` the best right item. A collapsed model that gives every pair the same score therefore gets the worst
rank, not a perfect one. Among an image's own captions ties do not matter (any of them is a hit).

Two entry points compute the same numbers: :func:`retrieval_metrics_from_similarity` over a dense similarity
matrix (simple path), and :func:`retrieval_metrics` over embeddings, which computes the similarity in chunks of
rows so that e.g. 20k images x 100k captions never materialises the 8 GB dense matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clipcraft.errors import ClipcraftError

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def _check_mapping(text_to_image: np.ndarray | Sequence[int], num_images: int, num_texts: int) -> np.ndarray:
    """Validate ``text_to_image`` and return it as an int64 array of shape (num_texts,)."""
    t2i = np.asarray(text_to_image)
    if t2i.ndim != 1:
        raise ClipcraftError(
            f"text_to_image must be 1-D (one image index per caption); got shape {t2i.shape}."
        )
    if t2i.shape[0] != num_texts:
        raise ClipcraftError(
            f"text_to_image has {t2i.shape[0]} entries but there are {num_texts} captions; "
            "give exactly one image index per caption."
        )
    if num_texts == 0 or num_images == 0:
        raise ClipcraftError(
            f"Retrieval needs at least one image and one caption; got {num_images} and {num_texts}."
        )
    if not np.issubdtype(t2i.dtype, np.integer):
        raise ClipcraftError(f"text_to_image must hold integer image indices; got dtype {t2i.dtype}.")
    t2i = t2i.astype(np.int64, copy=False)
    bad = np.flatnonzero((t2i < 0) | (t2i >= num_images))
    if bad.size:
        raise ClipcraftError(
            f"text_to_image maps {bad.size} caption(s) outside the {num_images} images (valid: 0..{num_images - 1}); "
            f"first: caption {bad[0]} -> image {t2i[bad[0]]}."
        )
    counts = np.bincount(t2i, minlength=num_images)  # (N_img,)
    orphans = np.flatnonzero(counts == 0)
    if orphans.size:
        shown = ", ".join(str(i) for i in orphans[:10])
        raise ClipcraftError(
            f"{orphans.size} image(s) have no caption (first: {shown}); image-to-text rank is undefined for them. "
            "Drop those images from the embeddings, or fix text_to_image."
        )
    return t2i


def _check_matrix(name: str, x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise ClipcraftError(f"{name} must be 2-D; got shape {x.shape}.")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ClipcraftError(f"{name} contains NaN or infinite values; ranks would be meaningless.")
    return x


def _i2t_ranks_block(sim: np.ndarray, text_to_image: np.ndarray, start: int) -> np.ndarray:
    """Image-to-text ranks for images ``start .. start + B`` given their rows ``sim`` (B, N_txt).

    ``sim`` is modified in place (right captions are masked out).
    """
    b = sim.shape[0]
    cols = np.flatnonzero(
        (text_to_image >= start) & (text_to_image < start + b)
    )  # right captions of the block
    rows = text_to_image[cols] - start
    best = np.full(b, -np.inf, dtype=sim.dtype)  # (B,) score of each image's best caption
    np.maximum.at(best, rows, sim[rows, cols])
    sim[rows, cols] = -np.inf  # only wrong captions may push an image down
    return 1 + np.count_nonzero(sim >= best[:, None], axis=1)  # (B,)


def _t2i_ranks_block(sim_t: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Text-to-image ranks for B captions given their rows ``sim_t`` (B, N_img) and their images (B,)."""
    right = sim_t[np.arange(sim_t.shape[0]), images]  # (B,)
    # Counting ``>=`` includes the right image itself, which is the "1 +" of the rank.
    return np.count_nonzero(sim_t >= right[:, None], axis=1)  # (B,)


def metrics_from_ranks(
    i2t_ranks: np.ndarray, t2i_ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Recall@k and mean/median rank from 1-based ranks.

    Returns ``i2t_r{k}`` and ``t2i_r{k}`` for each k (fractions in [0, 1]) and ``i2t_mean_rank``,
    ``i2t_median_rank``, ``t2i_mean_rank``, ``t2i_median_rank`` (1-based; a median may end in .5).
    """
    out: dict[str, float] = {}
    for prefix, ranks in (("i2t", np.asarray(i2t_ranks)), ("t2i", np.asarray(t2i_ranks))):
        for k in ks:
            out[f"{prefix}_r{k}"] = float(np.mean(ranks <= k))
    for prefix, ranks in (("i2t", np.asarray(i2t_ranks)), ("t2i", np.asarray(t2i_ranks))):
        out[f"{prefix}_mean_rank"] = float(np.mean(ranks))
        out[f"{prefix}_median_rank"] = float(np.median(ranks))
    return out


def retrieval_ranks_from_similarity(
    sim: np.ndarray, text_to_image: np.ndarray | Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks from a dense similarity matrix ``sim`` (N_img, N_txt), higher = more similar.

    Returns ``(i2t_ranks (N_img,), t2i_ranks (N_txt,))`` as int64, ties counted against the query (see the
    module docstring). Raises :class:`ClipcraftError` on shape mismatches, out-of-range mapping, images
    without captions or non-finite scores.
    """
    sim = _check_matrix("sim", np.asarray(sim))
    n_img, n_txt = sim.shape
    t2i = _check_mapping(text_to_image, n_img, n_txt)
    i2t_ranks = _i2t_ranks_block(sim.copy(), t2i, 0)
    t2i_ranks = _t2i_ranks_block(np.ascontiguousarray(sim.T), t2i)
    return i2t_ranks.astype(np.int64), t2i_ranks.astype(np.int64)


def retrieval_metrics_from_similarity(
    sim: np.ndarray, text_to_image: np.ndarray | Sequence[int], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Retrieval metrics from a dense similarity matrix ``sim`` (N_img, N_txt); the simple path.

    ``text_to_image`` (N_txt,) int maps each caption to its image row. Keys as in :func:`metrics_from_ranks`.
    """
    return metrics_from_ranks(*retrieval_ranks_from_similarity(sim, text_to_image), ks=ks)


def retrieval_ranks(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray | Sequence[int],
    *,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks from embeddings, computing the similarity ``image_emb @ text_emb.T`` in chunks.

    ``image_emb`` (N_img, D) and ``text_emb`` (N_txt, D) are floats, normally L2-normalized (the score is
    the plain dot product; nothing is normalized here). At most ``chunk_size`` rows of the similarity are
    held at once: (chunk_size, N_txt) for image-to-text, then (chunk_size, N_img) for text-to-image, in the
    embeddings' float dtype (float32 x 1024 x 100k captions = 400 MB). Returns the same as
    :func:`retrieval_ranks_from_similarity` up to float rounding of the dot products.
    """
    image_emb = _check_matrix("image_emb", np.asarray(image_emb))
    text_emb = _check_matrix("text_emb", np.asarray(text_emb))
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ClipcraftError(
            f"Image and text embeddings differ in width: {image_emb.shape[1]} vs {text_emb.shape[1]}; "
            "were they made by the same model?"
        )
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ClipcraftError(f"chunk_size must be a positive integer; got {chunk_size!r}.")
    dtype = np.result_type(image_emb.dtype, text_emb.dtype)
    image_emb, text_emb = image_emb.astype(dtype, copy=False), text_emb.astype(dtype, copy=False)
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    t2i = _check_mapping(text_to_image, n_img, n_txt)

    i2t_ranks = np.empty(n_img, dtype=np.int64)
    for start in range(0, n_img, chunk_size):
        stop = min(start + chunk_size, n_img)
        sim = image_emb[start:stop] @ text_emb.T  # (B, N_txt)
        i2t_ranks[start:stop] = _i2t_ranks_block(sim, t2i, start)

    t2i_ranks = np.empty(n_txt, dtype=np.int64)
    for start in range(0, n_txt, chunk_size):
        stop = min(start + chunk_size, n_txt)
        sim_t = text_emb[start:stop] @ image_emb.T  # (B, N_img)
        t2i_ranks[start:stop] = _t2i_ranks_block(sim_t, t2i[start:stop])
    return i2t_ranks, t2i_ranks


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray | Sequence[int],
    *,
    chunk_size: int = 1024,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Retrieval metrics from embeddings, memory-bounded by ``chunk_size`` rows; the fast path.

    ``image_emb`` (N_img, D), ``text_emb`` (N_txt, D), ``text_to_image`` (N_txt,) int. Keys as in
    :func:`metrics_from_ranks`: ``i2t_r1 i2t_r5 i2t_r10 t2i_r1 t2i_r5 t2i_r10`` and the mean/median ranks.
    """
    return metrics_from_ranks(
        *retrieval_ranks(image_emb, text_emb, text_to_image, chunk_size=chunk_size), ks=ks
    )
