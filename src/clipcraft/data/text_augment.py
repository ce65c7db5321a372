"""Caption augmentation for training: EDA's word-level edits without a thesaurus, and the run's schedule of
which caption variant a sample shows.

CLIP-🚀 (arXiv 2305.08675) augments captions with EDA (random deletion, swap, insertion and synonym
replacement). No WordNet is available offline, so the edits here are the three that need none: delete words,
swap two words, and insert a copy of a word of the same caption at a random place.

A run with ``text_augment_variants: V`` gives every caption V fixed variants (:func:`caption_variant`, a
function of the run seed, the variant number and the caption text) and shows, for each sample of each epoch,
the original or one of the variants (:func:`variant_choice`, a function of the run seed, the epoch, the image
and the caption). Both are pure, so a locked text tower can encode the variants once into its feature cache
and an unlocked one can edit the string in the loader: the two see the same captions, and a resumed run the
same as an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

Edit = Callable[[list[str], random.Random, int], list[str]]


def random_deletion(words: list[str], rng: random.Random, n: int) -> list[str]:
    """``words`` without ``n`` of them, chosen at random (order kept); at least one word always stays."""
    n = min(n, len(words) - 1)
    if n <= 0:
        return list(words)
    dropped = set(rng.sample(range(len(words)), n))
    return [w for i, w in enumerate(words) if i not in dropped]


def random_swap(words: list[str], rng: random.Random, n: int) -> list[str]:
    """``words`` after ``n`` swaps of two random positions (the same words, reordered)."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_insertion(words: list[str], rng: random.Random, n: int) -> list[str]:
    """``words`` with ``n`` copies of their own words (each drawn at random) inserted at random places."""
    out = list(words)
    if not out:
        return out
    for _ in range(n):
        out.insert(rng.randrange(len(out) + 1), rng.choice(words))
    return out


EDITS: dict[str, Edit] = {"delete": random_deletion, "swap": random_swap, "insert": random_insertion}


def augment_caption(
    text: str, rng: random.Random, strength: float, edits: Sequence[str] = tuple(EDITS)
) -> str:
    """``text`` with one edit, drawn from ``edits`` by ``rng``, applied to ``max(1, round(strength * n))`` of
    its ``n`` whitespace-separated words (EDA's alpha), the words joined by single spaces.

    ``strength`` is the fraction of words touched, in [0, 1]: 0 returns ``text`` unchanged, as does a text
    without words. Never returns an empty string for a text with words (deletion keeps at least one). The
    result depends only on ``text``, ``strength``, ``edits`` and the state of ``rng``. Raises ``ValueError``
    for a strength outside [0, 1] or an unknown edit.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1]; got {strength}")
    unknown = sorted(set(edits) - set(EDITS))
    if unknown or not edits:
        raise ValueError(f"unknown or no edits {unknown or list(edits)}; known: {list(EDITS)}")
    words = text.split()
    if strength == 0.0 or not words:
        return text
    n = max(1, round(strength * len(words)))
    edit = EDITS[rng.choice(list(edits))]
    return " ".join(edit(words, rng, n))


def caption_variant(text: str, variant: int, strength: float, seed: int) -> str:
    """Variant ``variant`` of a caption in a run seeded ``seed``: 0 is ``text`` itself, 1, 2, ... are
    :func:`augment_caption` with a generator seeded from (seed, variant, text), so the same caption gets the
    same variants wherever it appears, in any process and Python version."""
    if variant == 0:
        return text
    return augment_caption(text, random.Random(f"{seed}:{variant}:{text}"), strength)


_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array: a fixed, well-spread hash of each element."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def variant_choice(
    seed: int, epoch: int, images: np.ndarray | int, captions: np.ndarray | int, variants: int
) -> np.ndarray:
    """Which variant (0 = the original caption, 1 ... ``variants``) each sample shows: one int64 per
    element of ``images`` and ``captions`` (broadcast together), uniform over the ``variants + 1`` choices
    and a pure function of (seed, epoch, image index, caption index)."""
    images, captions = np.broadcast_arrays(np.asarray(images), np.asarray(captions))
    shape = images.shape
    h = np.full(images.size, seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)  # 1-D: arrays wrap silently
    for key in (np.full(images.size, epoch), images.reshape(-1), captions.reshape(-1)):
        h = _mix(h ^ key.astype(np.uint64))
    return (h % _U64(variants + 1)).astype(np.int64).reshape(shape)
