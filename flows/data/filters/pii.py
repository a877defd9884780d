"""PII masking: e-mail addresses, IPv4 addresses and phone numbers."""

from __future__ import annotations

import re

from flows.data.filters.base import DocFilter
from flows.data.text import Doc

_EMAIL_RE = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_IPV4_RE = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b")
# North-American and international forms: +44 20 7946 0958, (555) 123-4567, 555.123.4567.
_PHONE_RE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?!\w)")


class PIIMasker(DocFilter):
    """Rewrites e-mails, IPv4 addresses and phone numbers to placeholders; never drops."""

    name = "pii"
    prose_only = False
    drops = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.rules = [
            (rx, repl)
            for on, rx, repl in (
                (cfg.emails, _EMAIL_RE, "<EMAIL>"),
                (cfg.ips, _IPV4_RE, "<IP>"),
                (cfg.phones, _PHONE_RE, "<PHONE>"),
            )
            if on
        ]

    def filter(self, doc: Doc):
        text = doc.text
        for rx, repl in self.rules:
            text = rx.sub(repl, text)
        doc.text = text
        return True
