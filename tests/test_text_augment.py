"""Caption augmentation: the three word edits, augment_caption's contract, the seeded variants and the
per-epoch choice of variant."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from clipcraft.data.text_augment import (
    augment_caption,
    caption_variant,
    random_deletion,
    random_insertion,
    random_swap,
    variant_choice,
)

CAPTIONS = [
    "a dog runs on the grass",
    "two children play with a red ball in the park near the river",
    "dog",
    "a  cat\tsleeps ",
    "the the the cat",
]


def _is_subsequence(short: list[str], long: list[str]) -> bool:
    it = iter(long)
    return all(word in it for word in short)


@pytest.mark.parametrize("n", [0, 1, 3, 20])
def test_deletion_keeps_an_ordered_sub_multiset_and_at_least_one_word(n: int) -> None:
    for seed, text in enumerate(CAPTIONS * 4):
        words = text.split()
        out = random_deletion(words, random.Random(seed), n)
        assert _is_subsequence(out, words), (words, out)
        assert len(out) == len(words) - min(n, len(words) - 1)


@pytest.mark.parametrize("n", [1, 3])
def test_swap_reorders_and_insertion_adds_the_captions_own_words(n: int) -> None:
    for seed, text in enumerate(CAPTIONS * 4):
        words = text.split()
        swapped = random_swap(words, random.Random(seed), n)
        assert Counter(swapped) == Counter(words)
        inserted = random_insertion(words, random.Random(seed), n)
        assert len(inserted) == len(words) + n
        assert not Counter(words) - Counter(inserted) and set(inserted) <= set(words)
    long = CAPTIONS[1].split()
    assert any(random_swap(long, random.Random(s), 1) != long for s in range(5))


def test_strength_zero_returns_the_text_unchanged_and_bad_arguments_are_refused() -> None:
    for text in CAPTIONS + ["", "   "]:
        assert augment_caption(text, random.Random(0), 0.0) == text
    assert augment_caption("   ", random.Random(0), 0.5) == "   "  # no words: nothing to edit
    with pytest.raises(ValueError, match="strength"):
        augment_caption("a dog", random.Random(0), 1.5)
    with pytest.raises(ValueError, match="unknown"):
        augment_caption("a dog", random.Random(0), 0.5, edits=("synonym",))


def test_augment_caption_is_deterministic_never_empty_and_uses_only_the_captions_words() -> None:
    outputs = set()
    for strength in (0.1, 0.5, 1.0):
        for seed in range(30):
            for text in CAPTIONS:
                out = augment_caption(text, random.Random(seed), strength)
                assert out == augment_caption(text, random.Random(seed), strength)
                assert out.strip(), (text, seed, strength)
                assert set(out.split()) <= set(text.split())
                if text == CAPTIONS[1]:
                    outputs.add(out)
    assert len(outputs) > 20  # the edits and their places do vary with the generator
    # each edit alone, with strength 1 (every word counts): deletion shortens, insertion lengthens
    text = CAPTIONS[1]
    assert len(augment_caption(text, random.Random(1), 1.0, edits=("delete",)).split()) == 1
    assert len(augment_caption(text, random.Random(1), 0.25, edits=("insert",)).split()) == 13 + 3


def test_variants_are_seeded_by_run_variant_and_caption() -> None:
    text = CAPTIONS[1]
    assert caption_variant(text, 0, 0.3, seed=0) == text
    first = [caption_variant(text, v, 0.3, seed=0) for v in range(1, 6)]
    assert first == [caption_variant(text, v, 0.3, seed=0) for v in range(1, 6)]
    assert len(set(first)) > 1 and text not in first
    assert first != [caption_variant(text, v, 0.3, seed=1) for v in range(1, 6)]


def test_variant_choice_is_uniform_pure_and_keyed_by_epoch_image_and_caption() -> None:
    images, captions = np.arange(4000) // 5, np.arange(4000) % 5
    choice = variant_choice(7, 2, images, captions, variants=3)
    assert choice.dtype == np.int64 and choice.shape == (4000,)
    assert set(choice.tolist()) == {0, 1, 2, 3}
    assert np.bincount(choice) == pytest.approx([1000] * 4, rel=0.1)
    assert np.array_equal(choice, variant_choice(7, 2, images, captions, variants=3))
    assert int(variant_choice(7, 2, 11, 3, variants=3)) == choice[11 * 5 + 3]  # scalars: the same key
    assert (choice != variant_choice(7, 3, images, captions, variants=3)).mean() > 0.6  # another epoch
    assert (choice != variant_choice(8, 2, images, captions, variants=3)).mean() > 0.6  # another seed
