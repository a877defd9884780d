"""The per-document filters, one module each; DEFAULT is their one ordered list.

Adding a filter: a DocFilter subclass in a module of its own, and its entry in DEFAULT. Its drops
are accounted under its `name` (flows/data/accounting.py reads the stages from this list).
"""

from __future__ import annotations

from flows.data.filters.badwords import BadWords
from flows.data.filters.base import DocFilter
from flows.data.filters.c4 import C4
from flows.data.filters.fineweb import FineWeb
from flows.data.filters.gopher_quality import GopherQuality
from flows.data.filters.gopher_repetition import GopherRepetition
from flows.data.filters.langid import LanguageId
from flows.data.filters.pii import PIIMasker

# Pipeline order: language first (later filters may skip other languages), masking last.
DEFAULT: list[type[DocFilter]] = [LanguageId, GopherRepetition, GopherQuality, C4, FineWeb, BadWords, PIIMasker]


def default_filters(cfg, classes: list[type[DocFilter]] | None = None) -> list[DocFilter]:
    """The filters that are switched on in a DataConfig, in list order (DEFAULT unless given)."""
    built = (f.from_config(cfg) for f in (DEFAULT if classes is None else classes))
    return [f for f in built if f is not None]


__all__ = [
    "DEFAULT",
    "BadWords",
    "C4",
    "DocFilter",
    "FineWeb",
    "GopherQuality",
    "GopherRepetition",
    "LanguageId",
    "PIIMasker",
    "default_filters",
]
