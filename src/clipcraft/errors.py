"""Exceptions that speak to the user: what was wrong, where, and what to do."""

from __future__ import annotations


class ClipcraftError(Exception):
    """Base class for every error clipcraft raises on purpose."""


class UnknownNameError(ClipcraftError, KeyError):
    """A preset, tower, metric or format name that clipcraft does not know."""

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return str(self.args[0]) if self.args else ""


class PretrainedWeightsError(ClipcraftError):
    """Pretrained weights were asked for and could not be found or fetched."""


class ImageLoadError(ClipcraftError):
    """An image file is missing, unreadable or not an image."""


class CheckpointError(ClipcraftError):
    """A saved model directory is incomplete or does not match its config."""


def unknown_name(kind: str, name: str, known: list[str]) -> UnknownNameError:
    """Build an error for an unknown ``name`` that lists the closest known names first."""
    import difflib

    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(f"Unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known))}.")
