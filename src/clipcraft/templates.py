"""Prompt templates for zero-shot classification: the built-in set and template files.

One set for every job that builds a zero-shot head from class names (``classify``, ``eval zeroshot``,
fine-tuning's starting head and the server's zero-shot endpoint), so they all score the same prompts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from clipcraft.errors import ClipcraftError

# Written for clipcraft: plain photos first, then the ways real images differ from them (quality, framing,
# size, medium). Each holds one ``{}`` for the class name.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of a {}.",
    "a photo of a {} taken from far away.",
    "a blurry photo of a {}.",
    "a dark photo of a {}.",
    "a bright photo of a {}.",
    "a low-resolution photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a black and white photo of a {}.",
    "a drawing of a {}.",
    "a painting of a {}.",
    "a cartoon {}.",
    "a toy {}.",
    "a photo of the {} in its usual surroundings.",
)

TEMPLATE_SLOT = "{}"


def read_text_lines(path: str | os.PathLike[str], what: str) -> list[str]:
    """The lines of a UTF-8 text file (a BOM is dropped); a missing or unreadable file raises
    :class:`ClipcraftError` naming ``what`` (e.g. "Template") and the path."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise ClipcraftError(f"{what} file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ClipcraftError(f"Could not read {what} file {p}: {exc}. It must be UTF-8 text.") from exc


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """``templates`` as a tuple; raises :class:`ClipcraftError` when there are none or one has no ``{}``."""
    if len(templates) == 0:
        raise ClipcraftError("Zero-shot classification needs at least one prompt template.")
    for t in templates:
        if TEMPLATE_SLOT not in t:
            raise ClipcraftError(f"Template {t!r} has no '{{}}' where the class name goes.")
    return tuple(templates)


def load_templates(path: str | os.PathLike[str]) -> list[str]:
    """Read prompt templates, one per line, each holding ``{}`` where the class name goes.

    Surrounding whitespace is stripped; blank lines and lines starting with ``#`` are skipped. Every ``{}`` in
    a template is replaced by the class name and other braces are kept literally. A line without ``{}`` or a
    file with no templates raises :class:`ClipcraftError` naming the file and line.
    """
    templates: list[str] = []
    for lineno, raw in enumerate(read_text_lines(path, "Template"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if TEMPLATE_SLOT not in line:
            raise ClipcraftError(
                f"{path}:{lineno}: template {line!r} has no '{{}}' where the class name goes, "
                "e.g. 'a photo of a {}.'"
            )
        templates.append(line)
    if not templates:
        raise ClipcraftError(f"Template file {path} holds no templates (one per line, each with '{{}}').")
    return templates
