"""Text helpers shared by the filters: normalisation, word and sentence splitting.

Word splitting is a compiled regex that approximates the blank spaCy English tokenizer the
reference implementations (datatrove) use: the thresholds below were published for token
counts of that kind, and a plain `str.split` would shift every ratio near its threshold.
"""

from __future__ import annotations

import re
import unicodedata

# Order matters: abbreviations and numbers before the generic word rule.
_WORD_PATTERN = r"""(?:[^\W\d_]\.){2,}    # U.S.A., e.g.
    | (?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Mt|Prof|vs)\.     # titles spaCy keeps whole
    | (?<![^\W\d_])[A-Z]\.(?=\s)                 # initials: J. K.
    | \d+(?:[.,:]\d+)*                           # 3.5, 10,000, 10:30
    | (?<![^\W_])(?:[Cc]an(?=not\b)|not\b)       # can|not (spaCy's exception)
    | [^\W_]+(?=n['’]t\b)                        # do|n't
    | n['’]t\b
    | ['’](?:s|re|ve|ll|d|m|S|RE|VE|LL|D|M)\b    # people|'s
    | [^\W_]+
    | -{2,} | \.{2,} | …
    | [^\w\s] | _
    """
_WORD_RE = re.compile(_WORD_PATTERN, re.VERBOSE)
# spaCy keeps "wife;--and" whole; this slower rule runs only on texts that have "--".
_DASH_WORD_RE = re.compile(r"""(?:\S+?--\S*?|--\S+?)(?=[,.;:!?"”’)]*(?:\s|$)) | """ + _WORD_PATTERN, re.VERBOSE)
_ALNUM = re.compile(r"[^\W_]").search
_ALPHA = re.compile(r"[^\W\d_]").search
# spaCy's sentencizer ends a sentence at these tokens (the common ones; scripts we do not
# expect in English text are irrelevant to the C4 sentence count).
SENTENCE_END_TOKENS = frozenset("!.?‼⁇⁈⁉‽。！？؟۔।॥")
_SPACES_RE = re.compile(r"[ \t\f\v\u00a0\u2000-\u200b\u3000]+")
_TRAILING_RE = re.compile(r"[ \t]+\n")
_BLANKS_RE = re.compile(r"\n{3,}")


def normalize(text: str) -> str:
    """Unicode NFC, CRLF -> LF, runs of blanks -> one space, at most one empty line in a row."""
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _SPACES_RE.sub(" ", text)
    text = _TRAILING_RE.sub("\n", text)
    text = _BLANKS_RE.sub("\n\n", text)
    return text.strip()


def words(text: str) -> list[str]:
    return (_DASH_WORD_RE if "--" in text else _WORD_RE).findall(text)


def is_symbol(word: str) -> bool:
    """A token with no letter or digit: punctuation, dashes, ellipses."""
    return _ALNUM(word) is None


def has_alpha(word: str) -> bool:
    return _ALPHA(word) is not None


def count_sentences(tokens: list[str]) -> int:
    """spaCy sentencizer rule: a sentence starts at the first non-punctuation token after
    a sentence-final punctuation token."""
    if not tokens:
        return 0
    n, seen_end = 1, False
    for tok in tokens:
        if tok in SENTENCE_END_TOKENS:
            seen_end = True
        elif seen_end and not is_symbol(tok):
            n += 1
            seen_end = False
    return n


UNDETERMINED = "und"  # ISO 639-2: no language identified (language ID off, or a code domain)


class Doc:
    """One document moving through the filters; words are split once and cached until the
    text changes (C4 drops lines, PII masking rewrites spans). Language ID sets `lang`."""

    __slots__ = ("id", "lang", "_text", "_words")

    def __init__(self, id: str, text: str):
        self.id = id
        self.lang = UNDETERMINED
        self._text = text
        self._words = None

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, value: str):
        if value != self._text:
            self._text = value
            self._words = None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = words(self._text)
        return self._words
