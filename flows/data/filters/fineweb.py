"""FineWeb's custom filters (Penedo et al. 2024, section 3.3), as datatrove implements them."""

from __future__ import annotations

from flows.data.filters._text import duplicates
from flows.data.filters.base import DocFilter
from flows.data.text import Doc

# Sentence-final characters of the scripts herd keeps by default (FineWeb's stop_chars).
_TERMINAL = tuple(".!?。！？؟۔।॥‼⁇⁈⁉‽")


class FineWeb(DocFilter):
    name = "fineweb"

    def filter(self, doc: Doc):
        c, text = self.cfg, doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        if sum(1 for line in lines if line.endswith(_TERMINAL)) / len(lines) < c.line_punct_thr:
            return "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= c.short_line_length) / len(lines) > c.short_line_thr:
            return "short_line_ratio"
        if duplicates(lines)[1] / max(1, len(text) - text.count("\n")) > c.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(1, len(doc.words)) > c.new_line_ratio:
            return "list_ratio"
        return True
