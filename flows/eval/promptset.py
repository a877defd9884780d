"""The held-out human-evaluation prompt set: 1,800 prompts in Meta's 12 use cases, built from the
shared prompt data by a category classifier plus templates, and its contamination check.

Sources are the shared SFT (alpaca) and preference (sharegpt) records in the held-out split
(flows/heldout.py). Each source gives its own prompt, labelled by `classify` (ordered keyword rules
over the request), and one templated prompt per use case: templates reuse the source's request
(advice, brainstorming, creative writing, a character, open QA, coding, reasoning) or its reference
answer as a passage (summarisation, extraction, rewriting, classification, closed QA). Each use
case then takes PER_USE_CASE prompts, the source's own prompts first, in digest order.

No prompt may share a 13-gram with any training set (`training_sets`: what the SFT/DPO/reward
loaders read after exclusion, the embedded RS/PPO tasks, the pretraining corpora); the builder
drops candidates that do, and `contamination` is the check, reported per training set.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from model.errors import HerdError

USE_CASES = (
    "advice",
    "brainstorming",
    "classification",
    "closed_qa",
    "coding",
    "creative_writing",
    "extraction",
    "inhabiting_a_character",
    "open_qa",
    "reasoning",
    "rewriting",
    "summarization",
)
PER_USE_CASE = 150
NGRAM = 13
SOURCES = ("sft/alpaca_en_demo.json", "preference/dpo_en_demo.json")  # the human-eval prompts come from these
RED_TEAM_SOURCE = "preference/hh-rlhf_harmless-base_test.jsonl"  # held out for the red team (flows/eval/safety.py)
PASSAGE_WORDS = (40, 160)  # a reference answer serves as a passage when it has at least 40 words; cut at 160

# Ordered: the first rule that matches the request names its use case; none: open QA.
RULES = [
    (
        "inhabiting_a_character",
        r"\b(pretend (you are|to be)|act as|you are an? |role-?play|imagine (you are|being)|"
        r"in the (voice|role) of|stay in character|as if you were)\b",
    ),
    (
        "coding",
        r"\b(code|python|javascript|java|c\+\+|sql|html|css|function|program|algorithm|regex|script|api|"
        r"compile|debug)\b",
    ),
    ("summarization", r"\b(summari[sz]e|summary|tl;?dr|main points?|in (a|one) (few words|sentence|nutshell))\b"),
    (
        "rewriting",
        r"\b(rewrite|rephrase|paraphrase|reword|edit|revise|transform|convert|translate|correct|shorten|"
        r"simplify|make (it|this|the (following|sentence|text)) (more|less))\b",
    ),
    (
        "extraction",
        r"\b(extract|pull out|identify (all|the|every)|find (all|the) .{0,30}\b(in|from)|"
        r"list (all|the) .{0,30}\b(in|from|mentioned))\b",
    ),
    (
        "classification",
        r"\b(classify|categori[sz]e|which (category|type|class)|sentiment|label (the|each|this)|"
        r"is (this|the following|it) (a|an) )",
    ),
    (
        "brainstorming",
        r"\b(brainstorm|ideas?|suggest|come up with|list (of )?(\d+|three|five|ten|some)|"
        r"generate a list|name (\d+|three|five|some))\b",
    ),
    ("advice", r"\b(advice|should i|how (can|do|should) i|tips?|recommend|what can i do)\b"),
    (
        "creative_writing",
        r"\b(story|poem|haiku|limerick|song|lyrics|slogan|tweet|dialogue|narrative|fiction|"
        r"(write|compose) (a|an) (letter|essay|speech|blog))\b",
    ),
    (
        "reasoning",
        r"\b(calculate|compute|solve|how many|equation|logic|deduce|riddle|puzzle|probability|"
        r"\d+\s*[-+*/x]\s*\d+|prove|reason)\b",
    ),
    (
        "closed_qa",
        r"\b(according to|based on|given (the|this) (text|passage|paragraph|information)|in the (text|passage))\b",
    ),
]
_RULES = [(uc, re.compile(p, re.I)) for uc, p in RULES]

PERSONAS = (
    "a ship's captain in 1850",
    "a patient kindergarten teacher",
    "a grumpy medieval blacksmith",
    "a detective in 1920s Chicago",
    "a cheerful tour guide in Rome",
    "a retired astronaut",
    "a Shakespearean actor",
    "a pirate who loves grammar",
    "a Victorian-era scientist",
    "a tired night-shift nurse",
    "a soft-spoken librarian",
    "a sports commentator",
)

# (field, template): `request` is the source's request, `passage` its reference answer (40-160 words).
TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "advice": [
        ("request", 'A friend has to do this and feels stuck: "{request}" What advice would you give them?'),
        ("request", 'I need to handle this well: "{request}" What mistakes should I avoid?'),
    ],
    "brainstorming": [
        ("request", 'Brainstorm five different ways to approach this request: "{request}"'),
        ("request", 'List six unusual angles someone could take on this: "{request}"'),
    ],
    "classification": [
        (
            "passage",
            "Classify the tone of this text as positive, negative or neutral. Answer with one word.\n\n{passage}",
        ),
        ("passage", "Is this text mainly instructions, an explanation, or a story? Answer with one word.\n\n{passage}"),
    ],
    "closed_qa": [
        ("passage", "Using only the text below, what is its main claim?\n\n{passage}"),
        ("passage", "According to this text alone, which detail comes first?\n\n{passage}"),
    ],
    "coding": [
        ("request", 'Write a short Python function that would help someone with this task: "{request}"'),
        ("passage", "Write Python code that counts how often each word occurs in this text:\n\n{passage}"),
    ],
    "creative_writing": [
        ("request", 'Write a four-line poem inspired by this request: "{request}"'),
        ("request", 'Write a very short story in which a character must do this: "{request}"'),
    ],
    "extraction": [
        ("passage", "Extract every name, number and place from this text, one per line.\n\n{passage}"),
        ("passage", "Pull out the three most important keywords of this text.\n\n{passage}"),
    ],
    "inhabiting_a_character": [("request", 'You are {persona}. Stay in character and respond to this: "{request}"')],
    "open_qa": [
        ("request", 'What background knowledge does someone need to answer this well: "{request}"'),
        ("request", 'Why might people find this request hard to answer: "{request}"'),
    ],
    "reasoning": [
        ("passage", "How many sentences does this text have? Explain your counting step by step.\n\n{passage}"),
        ("request", 'Reason step by step: what information is missing to answer this fully? "{request}"'),
    ],
    "rewriting": [
        ("passage", "Rewrite this text so that a ten-year-old could follow it.\n\n{passage}"),
        ("passage", "Rewrite this text in a formal tone.\n\n{passage}"),
    ],
    "summarization": [
        ("passage", "Summarize this text in two sentences.\n\n{passage}"),
        ("passage", "Give a one-line summary of this passage.\n\n{passage}"),
    ],
}


@dataclass(frozen=True)
class Source:
    id: str  # the digest of its request (flows/heldout.digest)
    origin: str  # the shared file it came from
    request: str  # the first user turn
    answer: str  # the reference reply


@dataclass(frozen=True)
class Prompt:
    id: str
    use_case: str
    prompt: str
    source: str  # the source's id
    templated: bool


def classify(request: str) -> str:
    for uc, rx in _RULES:
        if rx.search(request):
            return uc
    return "open_qa"


def _h(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()


def passage_of(answer: str) -> str | None:
    words = answer.split()
    if len(words) < PASSAGE_WORDS[0]:
        return None
    if len(words) <= PASSAGE_WORDS[1]:
        return answer.strip()
    cut = " ".join(words[: PASSAGE_WORDS[1]])
    end = max(cut.rfind(". "), cut.rfind(".\n"))
    return cut[: end + 1] if end > len(cut) // 2 else cut


def read_records(data_dir: Path, sources=SOURCES) -> list[tuple[str, list[dict], str]]:
    """(origin, prompt messages, reference reply) for every usable shared record, held out or not."""
    from flows.finetune import chat

    out = []
    for rel in sources:
        path = data_dir / rel
        if not path.is_file():
            raise HerdError(f"{path}: shared prompt data not found (the held-out split covers {', '.join(sources)})")
        for rec in chat._read_records(path, chat.Counts()):
            conv = chat.to_conversation(rec)
            if conv is None:
                continue
            if "messages" in conv and not chat.validate_messages(conv["messages"]):
                msgs = conv["messages"]
                reply = next((m["content"] for m in msgs if m["role"] == "assistant"), "")
                out.append((rel, [m for m in msgs if m["role"] != "assistant"][:1], reply))
            elif "prompt" in conv and not chat.validate_pair(conv):
                out.append((rel, conv["prompt"], conv["chosen"]))
    return out


def heldout_sources(data_dir: Path) -> list[Source]:
    from flows.heldout import digest, first_user, is_heldout

    seen, out = set(), []
    for origin, msgs, reply in read_records(data_dir):
        request = first_user(msgs)
        if not request or not is_heldout(request):
            continue
        sid = digest(request)
        if sid not in seen:
            seen.add(sid)
            out.append(Source(sid, origin, request.strip(), reply))
    return out


def candidates(src: Source) -> list[Prompt]:
    """The source's own prompt (classified) and one templated prompt per use case it can fill."""
    out = [Prompt(_h("own", src.id), classify(src.request), src.request, src.id, False)]
    passage = passage_of(src.answer)
    for uc, options in TEMPLATES.items():
        usable = [
            (f, t) for f, t in options if (f == "passage" and passage) or (f == "request" and len(src.request) <= 400)
        ]
        if not usable:
            continue
        f, t = usable[int(_h(uc, src.id)[:8], 16) % len(usable)]
        persona = PERSONAS[int(_h("persona", src.id)[:8], 16) % len(PERSONAS)]
        text = t.format(request=src.request, passage=passage or "", persona=persona)
        out.append(Prompt(_h(uc, t, src.id), uc, text, src.id, True))
    return out


# --- contamination: 13-gram overlap with every training set -----------------------------------


def ngrams(text: str, n: int = NGRAM) -> set[int]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def training_sets(data_dir: Path | None) -> dict[str, Iterable[str]]:
    """Every text a training stage reads, by stage and source, after the held-out exclusion."""
    from flows.data.embedded import embedded_documents
    from flows.finetune import chat
    from flows.finetune import tasks as T

    def convs(path):
        for msgs in chat.load_conversations([path])[0]:
            yield from (m["content"] for m in msgs)

    def pairs(path):
        for p in chat.load_pairs([path])[0]:
            yield from [*(m["content"] for m in p["prompt"]), p["chosen"], p["rejected"]]

    def embedded_tasks():
        for split in ("train", "rs"):
            for t in T.generate_tasks(256, 0, T.KINDS, split):
                yield t["prompt"]

    out: dict[str, Iterable[str]] = {
        "pretrain:embedded_corpus": (text for _, text in embedded_documents()),
        "sft,rs,ppo:embedded_tasks": embedded_tasks(),
    }
    if data_dir is not None:
        out["sft:alpaca_en_demo"] = convs(data_dir / "sft" / "alpaca_en_demo.json")
        out["dpo:dpo_en_demo"] = pairs(data_dir / "preference" / "dpo_en_demo.json")
        out["dpo,rm:hh-rlhf_harmless"] = pairs(data_dir / "preference" / "hh-rlhf_harmless-base_test.jsonl")
        for f in sorted((data_dir / "corpus").glob("*.txt")):
            out[f"pretrain:corpus/{f.name}"] = [f.read_text(encoding="utf-8", errors="replace")]
    return out


def training_grams(sets: dict[str, Iterable[str]]) -> dict[str, set[int]]:
    return {name: set().union(*(ngrams(t) for t in texts)) for name, texts in sets.items()}


def contamination(prompts: Iterable[str], grams: dict[str, set[int]]) -> dict[str, int]:
    """Per training set: how many prompts share at least one 13-gram with it."""
    pg = [ngrams(p) for p in prompts]
    return {name: sum(bool(g & tg) for g in pg) for name, tg in grams.items()}


# --- the build --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    prompts: list[Prompt]
    sources: list[Source]
    dropped_contaminated: int
    available: dict[str, int]  # candidates per use case before the quota


def write_digests(data_dir: str | Path, path: Path | None = None) -> Path:
    """List the digest of every held-out shared record (all of them, used or not, the red team's HH
    prompts included) for the loaders."""
    from flows.heldout import HELDOUT_DIGESTS, _listed, digest, first_user, is_heldout

    path = path or HELDOUT_DIGESTS
    found = sorted(
        {
            digest(r)
            for _, msgs, _ in read_records(Path(data_dir), (*SOURCES, RED_TEAM_SOURCE))
            if (r := first_user(msgs)) and is_heldout(r)
        }
    )
    path.write_text(
        "# sha256 of the first user turn of each shared record held out for the sealed eval set\n"
        "# (flows/heldout.py); the training loaders drop these. Written by `herd evalset build`.\n"
        + "".join(d + "\n" for d in found),
        encoding="utf-8",
    )
    _listed.cache_clear()
    return path


def build(data_dir: str | Path, per_use_case: int = PER_USE_CASE) -> Built:
    from flows.heldout import excluded

    data_dir = Path(data_dir)
    sources = heldout_sources(data_dir)
    missing = sum(not excluded(s.request) for s in sources)
    if missing:
        raise HerdError(
            f"{missing} held-out source(s) are not in the training loaders' exclusion list "
            "(flows/heldout.HELDOUT_DIGESTS): run write_digests first (herd evalset build does)"
        )
    grams = training_grams(training_sets(data_dir))
    everything = set().union(*grams.values())
    pool: dict[str, list[Prompt]] = {uc: [] for uc in USE_CASES}
    seen, dropped = set(), 0
    for src in sources:
        for p in candidates(src):
            key = " ".join(p.prompt.split()).lower()
            if key in seen:
                continue
            seen.add(key)
            if ngrams(p.prompt) & everything:
                dropped += 1
                continue
            pool[p.use_case].append(p)
    short = {uc: len(ps) for uc, ps in pool.items() if len(ps) < per_use_case}
    if short:
        raise HerdError(f"prompt set: too few candidates for {per_use_case} per use case: {short}")
    chosen = []
    for uc in USE_CASES:
        chosen += sorted(pool[uc], key=lambda p: (p.templated, p.id))[:per_use_case]
    return Built(chosen, sources, dropped, {uc: len(ps) for uc, ps in pool.items()})


def to_records(prompts: list[Prompt]) -> list[dict]:
    return [
        {"id": p.id, "use_case": p.use_case, "prompt": p.prompt, "source": p.source, "templated": p.templated}
        for p in prompts
    ]


def from_records(records: list[dict]) -> list[Prompt]:
    try:
        return [
            Prompt(str(r["id"]), str(r["use_case"]), str(r["prompt"]), str(r["source"]), bool(r["templated"]))
            for r in records
        ]
    except (KeyError, TypeError) as e:
        raise HerdError(f"prompt set: a record lacks {e}") from None
