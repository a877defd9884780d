"""Language identification with py3langid: langid.py's naive Bayes model (97 languages),
which ships inside the wheel -- nothing is downloaded."""

from __future__ import annotations

from flows.data.config import LangIdConfig
from flows.data.text import Doc

UNDETERMINED = "und"  # ISO 639-2: no language identified (language ID off, or a code domain)


class LanguageId:
    name = "langid"

    def __init__(self, cfg: LangIdConfig):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.cfg = cfg
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
        return self.decide(*self.classify(doc.text))

    def decide(self, lang: str, score: float):
        """True, or the drop reason, for a classified document."""
        if self.keep and lang not in self.keep:
            return f"language_{lang}"
        if score < self.cfg.threshold:
            return "low_confidence"
        return True
