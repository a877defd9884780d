"""Language identification with py3langid: langid.py's naive Bayes model (97 languages),
which ships inside the wheel -- nothing is downloaded."""

from __future__ import annotations

from flows.data.filters.base import DocFilter
from flows.data.text import Doc


class LanguageId(DocFilter):
    """Records the document's language on it (kept in the `lang` column, whatever the decision);
    keeps it when the language is listed and the model's score reaches the threshold."""

    name = "langid"

    def __init__(self, cfg):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        super().__init__(cfg)
        self.keep = frozenset(cfg.keep)
        self.model = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        unknown = sorted(self.keep - set(self.model.nb_classes))
        if unknown:
            from model.errors import HerdError

            raise HerdError(f"langid.keep: {', '.join(unknown)} not among the model's languages")

    def classify(self, text: str) -> tuple[str, float]:
        lang, score = self.model.classify(text[: self.cfg.max_chars])
        return lang, float(score)

    def filter(self, doc: Doc):
        doc.lang, score = self.classify(doc.text)
        if self.keep and doc.lang not in self.keep:
            return f"language_{doc.lang}"
        if score < self.cfg.threshold:
            return "low_confidence"
        return True
