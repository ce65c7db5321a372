"""The package version, in a module of its own so the core can record it without importing the package face."""

from __future__ import annotations

__version__ = "0.1.0"  # keep equal to pyproject.toml's [project] version
