"""bench/quality's documents: varied text available offline, from textbook-like to spam.

Sources (deterministic for a given shared-data directory and Python): Python's documentation
(the embedded corpus), stdlib source code, Gutenberg novels and Shakespeare in ~1,000-character
chunks, Alpaca instruction/answer pairs, HH-RLHF and DPO dialogues, MMLU questions grouped by
subject, CommonsenseQA questions, and templated boilerplate (cookie, navigation, legal) and spam.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchDoc:
    id: str
    source: str
    text: str


def _chunks(text: str, size: int = 1000) -> list[str]:
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= size:
            out.append(cur[: size * 2])
            cur = ""
    return out


def _books(shared: Path, rng: random.Random, per_book: int) -> list[BenchDoc]:
    docs = []
    for f in sorted((shared / "corpus").glob("*.txt")):
        chunks = _chunks(f.read_text(encoding="utf-8-sig").replace("\r\n", "\n"))
        for i in sorted(rng.sample(range(len(chunks)), min(per_book, len(chunks)))):
            docs.append(BenchDoc(f"book:{f.stem}:{i}", "book", chunks[i]))
    return docs


def _alpaca(shared: Path, rng: random.Random, n: int) -> list[BenchDoc]:
    rows = json.loads((shared / "sft" / "alpaca_en_demo.json").read_text())
    pick = sorted(rng.sample(range(len(rows)), min(n, len(rows))))
    return [
        BenchDoc(
            f"alpaca:{i}",
            "alpaca",
            f"{rows[i]['instruction']}\n{rows[i]['input']}\n\n{rows[i]['output']}".replace("\n\n\n", "\n\n"),
        )
        for i in pick
    ]


def _dialogues(shared: Path, rng: random.Random, n: int) -> list[BenchDoc]:
    docs = []
    lines = (shared / "preference" / "hh-rlhf_harmless-base_test.jsonl").read_text().splitlines()
    for i in sorted(rng.sample(range(len(lines)), min(n // 2, len(lines)))):
        docs.append(BenchDoc(f"hh:{i}", "hh-rlhf", json.loads(lines[i])["chosen"].strip()))
    rows = json.loads((shared / "preference" / "dpo_en_demo.json").read_text())
    for i in sorted(rng.sample(range(len(rows)), min(n // 2, len(rows)))):
        r = rows[i]
        docs.append(
            BenchDoc(f"dpo:{i}", "dpo", "\n\n".join([c["value"] for c in r["conversations"]] + [r["chosen"]["value"]]))
        )
    return docs


def _mmlu(shared: Path, rng: random.Random, n: int) -> list[BenchDoc]:
    docs = []
    files = sorted((shared / "mmlu" / "test").glob("*.csv"))
    for f in files:
        rows = list(csv.reader(f.open(encoding="utf-8")))[1:]
        for k in range(0, min(len(rows), 5 * max(1, n // len(files))), 5):
            qs = [f"{r[0]}\n(A) {r[1]} (B) {r[2]} (C) {r[3]} (D) {r[4]}" for r in rows[k : k + 5]]
            docs.append(
                BenchDoc(
                    f"mmlu:{f.stem}:{k}",
                    "mmlu",
                    f"{f.stem.replace('_test', '').replace('_', ' ').title()} questions\n\n" + "\n\n".join(qs),
                )
            )
    return rng.sample(docs, min(n, len(docs)))


def _csqa(shared: Path, rng: random.Random, n: int) -> list[BenchDoc]:
    lines = (shared / "commonsenseqa" / "train_rand_split.jsonl").read_text().splitlines()
    pick = rng.sample(range(len(lines)), min(n * 4, len(lines)))
    docs = []
    for k in range(0, len(pick), 4):
        qs = [json.loads(lines[i])["question"] for i in pick[k : k + 4]]
        docs.append(
            BenchDoc(
                f"csqa:{pick[k]}",
                "csqa",
                "\n\n".join(q["stem"] + " " + ", ".join(c["text"] for c in q["choices"]) for q in qs),
            )
        )
    return docs


def _python(rng: random.Random, n_docs: int, n_code: int) -> list[BenchDoc]:
    from flows.data.config import EmbeddedConfig
    from flows.data.embedded import embedded_documents, stdlib_files

    # English documentation only (the code comes below, in 40-line windows).
    docs = [
        BenchDoc(f"pydoc:{i}", "python-docs", t[:2000])
        for i, t in embedded_documents(0, 1, EmbeddedConfig(code_files=0, multilingual=False))
    ]
    docs = rng.sample(docs, min(n_docs, len(docs)))
    files = stdlib_files()
    code = []
    for f in rng.sample(files, min(n_code, len(files))):
        src = f.read_text(encoding="utf-8", errors="replace")
        lines = src.splitlines()
        start = rng.randrange(max(1, len(lines) - 40))
        code.append(BenchDoc(f"code:{f.name}:{start}", "python-code", "\n".join(lines[start : start + 40])))
    return docs + code


_SITES = ["ShopNow", "BestDeals", "MyNewsPortal", "TravelHub", "CityGuide", "FitLife", "TechBargains", "HomeStyle"]
_NAV = [
    "Home",
    "About Us",
    "Contact",
    "Blog",
    "Shop",
    "Careers",
    "FAQ",
    "Login",
    "Register",
    "Cart",
    "Sitemap",
    "Privacy Policy",
    "Terms of Service",
    "Help Center",
    "Gift Cards",
    "Store Locator",
    "Newsletter",
]
_COOKIE = [
    "We use cookies and similar technologies to improve your browsing experience, personalise content and ads, and "
    "analyse our traffic.",
    'By clicking "Accept All", you consent to our use of cookies. You can manage your preferences at any time.',
    "Some cookies are essential for the site to function; others help us understand how you use it.",
    "Accept all cookies | Reject non-essential | Cookie settings",
]
_LEGAL = [
    "These Terms of Service govern your use of the website operated by {s}. By accessing the site you agree to be "
    "bound by these terms.",
    "{s} reserves the right to modify these terms at any time without notice. Continued use constitutes acceptance.",
    "In no event shall {s}, its affiliates or licensors be liable for any indirect, incidental or consequential "
    "damages.",
    'All content is provided "as is" without warranty of any kind, express or implied.',
    "Copyright (c) 2024 {s}. All rights reserved. Reproduction without written permission is prohibited.",
]
_SPAM = [
    "BUY NOW!!! Limited time offer",
    "Cheap {p} best price guaranteed",
    "Click here to claim your FREE {p}",
    "Hot singles in your area",
    "Win $1000 today casino bonus",
    "Lose 20 pounds in 2 weeks with this one trick",
    "100% FREE {p} no credit card needed",
    "Best {p} deals online discount coupon code",
    "Earn money from home $$$",
    "Top 10 {p} you won't believe number 7",
    "order {p} online cheap fast shipping",
]
_PRODUCTS = [
    "watches",
    "sunglasses",
    "pills",
    "loans",
    "followers",
    "crypto",
    "shoes",
    "handbags",
    "iPhone",
    "gift cards",
]


def _boilerplate(rng: random.Random, n: int) -> list[BenchDoc]:
    docs = []
    for i in range(n):
        s = rng.choice(_SITES)
        kind = i % 4
        if kind == 0:
            parts = rng.sample(_COOKIE, 3) + [" | ".join(rng.sample(_NAV, 8))]
        elif kind == 1:
            parts = [
                " | ".join(rng.sample(_NAV, 10)),
                f"Welcome to {s}! Sign up for our newsletter.",
                " | ".join(rng.sample(_NAV, 6)),
                f"(c) 2024 {s}. All rights reserved.",
            ]
        elif kind == 2:
            parts = [t.format(s=s) for t in rng.sample(_LEGAL, 4)]
        else:
            parts = [rng.choice(_SPAM).format(p=rng.choice(_PRODUCTS)) + "!" for _ in range(rng.randint(6, 14))]
            if rng.random() < 0.5:
                parts.append(f"visit www.{s.lower()}-deals.biz now")
        docs.append(BenchDoc(f"boiler:{i}", ["cookie", "navigation", "legal", "spam"][kind], "\n".join(parts)))
    return docs


def build_documents(shared: Path, seed: int = 0) -> list[BenchDoc]:
    """About 2,400 documents, shuffled so that any prefix is a sample of every source."""
    rng = random.Random(seed)
    docs = (
        _books(shared, rng, 90)
        + _alpaca(shared, rng, 300)
        + _dialogues(shared, rng, 300)
        + _mmlu(shared, rng, 250)
        + _csqa(shared, rng, 150)
        + _python(rng, 450, 250)
        + _boilerplate(rng, 350)
    )
    seen, out = set(), []
    for d in docs:
        if d.text.strip() and d.text not in seen:
            seen.add(d.text)
            out.append(d)
    rng.shuffle(out)
    return out
