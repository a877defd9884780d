"""The per-document filter interface (datatrove's): one class per filter, its settings given to the
constructor, `filter(doc) -> True | reason`. A drop is accounted as `name:reason`.

A filter's settings are its section of DataConfig (config.py, defaults: the published thresholds).
"""

from __future__ import annotations

from flows.data.text import Doc


class DocFilter:
    name = ""  # the filter's section of DataConfig, and its stage in the accounting
    # A filter for natural-language prose, which documents of a code domain skip: the heuristics
    # would drop nearly every source file.
    prose_only = True
    # False for a filter that only rewrites text: the accounting lists no stage for it.
    drops = True

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def from_config(cls, cfg) -> DocFilter | None:
        """The filter built from its section of a DataConfig, or None when that section is off."""
        section = getattr(cfg, cls.name)
        return cls(section) if section.enabled else None

    def filter(self, doc: Doc) -> bool | str:
        """True to keep the document (whose text the filter may rewrite), else the drop reason."""
        raise NotImplementedError
