"""Chat data: loaders (JSONL `messages`, alpaca, sharegpt, preference pairs), formatting with the
model's chat template, loss on assistant tokens only, packing with document masking.

Bad records are counted by reason (`Counts`) and skipped, never raised: missing or unknown roles,
an empty assistant turn, a conversation longer than the context, a malformed line. The sources of
the sealed evaluation set (listed by digest, flows/heldout.py) are dropped as `heldout:eval_set`, so
SFT, DPO and the reward model never train on what the gate's win rate is measured with.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flows.heldout import excluded, first_user
from model.errors import HerdError

IGNORE = -100
ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}


@dataclass
class Counts:
    """Records read, kept, and dropped by reason; `report()` is what the stages log."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def report(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "dropped_total": sum(self.dropped.values()),
        }


# --- loaders: every record becomes {"messages": [...]} or {"prompt": [...], "chosen": str, "rejected": str} ---


def _read_records(path: Path, counts: Counts):
    """JSON array or JSONL; malformed lines are counted as `read:bad_json`."""
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            counts.read += 1
            counts.drop("read:bad_json")
            return
        yield from data
        return
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            counts.read += 1
            counts.drop("read:bad_json")


def _sharegpt_turns(turns) -> list[dict] | None:
    if not isinstance(turns, list):
        return None
    out = []
    for t in turns:
        if not isinstance(t, dict):
            return None
        role = SHAREGPT_ROLES.get(str(t.get("from", t.get("role", ""))).lower())
        content = t.get("value", t.get("content"))
        if role is None or not isinstance(content, str):
            return [{"role": None, "content": content}]
        out.append({"role": role, "content": content})
    return out


def _hh_split(text: str) -> list[dict] | None:
    """Anthropic HH-RLHF "\\n\\nHuman: ... \\n\\nAssistant: ..." into messages."""
    import re

    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    msgs = []
    for i in range(1, len(parts) - 1, 2):
        msgs.append({"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1].strip()})
    return msgs or None


def to_conversation(rec) -> dict | None:
    """One record in any supported format -> {"messages"} (SFT) or {"prompt", "chosen", "rejected"} (pairs)."""
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:  # JSONL messages (OpenAI style)
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            return None
        return {"messages": [m if isinstance(m, dict) else {"role": None, "content": None} for m in msgs]}
    if "instruction" in rec or "output" in rec:  # alpaca
        instr, inp, out = rec.get("instruction"), rec.get("input", ""), rec.get("output")
        user = instr if not inp else f"{instr}\n\n{inp}" if isinstance(instr, str) and isinstance(inp, str) else None
        msgs = []
        if isinstance(rec.get("system"), str) and rec["system"]:
            msgs.append({"role": "system", "content": rec["system"]})
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
        return {"messages": msgs}
    if "conversations" in rec:  # sharegpt (and sharegpt-style preference pairs)
        turns = _sharegpt_turns(rec["conversations"])
        if turns is None:
            return None
        if "chosen" in rec and "rejected" in rec:
            c, r = rec["chosen"], rec["rejected"]
            c = c.get("value") if isinstance(c, dict) else c
            r = r.get("value") if isinstance(r, dict) else r
            return {"prompt": turns, "chosen": c, "rejected": r}
        return {"messages": turns}
    if "chosen" in rec and "rejected" in rec:
        c, r = rec["chosen"], rec["rejected"]
        if "prompt" in rec:  # {"prompt": str | messages, "chosen": str, "rejected": str}
            p = rec["prompt"]
            prompt = [{"role": "user", "content": p}] if isinstance(p, str) else p
            return {"prompt": prompt, "chosen": c, "rejected": r}
        if isinstance(c, str) and isinstance(r, str):  # HH-RLHF: two full transcripts sharing a prefix
            cm, rm = _hh_split(c), _hh_split(r)
            if not cm or not rm or cm[-1]["role"] != "assistant" or rm[-1]["role"] != "assistant" or cm[:-1] != rm[:-1]:
                return {"prompt": None, "chosen": None, "rejected": None}
            return {"prompt": cm[:-1], "chosen": cm[-1]["content"], "rejected": rm[-1]["content"]}
    return None


def validate_messages(msgs: list[dict]) -> str | None:
    """None if usable for SFT, else the drop reason."""
    if not msgs:
        return "empty"
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return "bad_role" if isinstance(m, dict) and m.get("role") else "missing_role"
        if not isinstance(m.get("content"), str):
            return "missing_content"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no_assistant"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        return "empty_assistant"
    if not any(m["role"] == "user" for m in msgs):
        return "no_user"
    return None


def validate_pair(rec: dict) -> str | None:
    prompt = rec.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        return "bad_prompt"
    for m in prompt:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            return "missing_role"
    if not isinstance(rec.get("chosen"), str) or not isinstance(rec.get("rejected"), str):
        return "missing_response"
    if not rec["chosen"].strip() or not rec["rejected"].strip():
        return "empty_assistant"
    if rec["chosen"] == rec["rejected"]:
        return "identical_pair"
    return None


def load_conversations(paths, counts: Counts | None = None, limit: int = 0) -> tuple[list[list[dict]], Counts]:
    """SFT conversations from files (JSON array or JSONL, any supported format)."""
    counts = counts or Counts()
    out = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if not path.is_file():
            raise HerdError(f"{path}: SFT data not found")
        for rec in _read_records(path, counts):
            counts.read += 1
            conv = to_conversation(rec)
            if conv is None:
                counts.drop("format:unknown")
                continue
            if "messages" not in conv:  # a preference pair used for SFT: train on the chosen reply
                reason = validate_pair(conv)
                if reason:
                    counts.drop(f"format:{reason}")
                    continue
                conv = {"messages": conv["prompt"] + [{"role": "assistant", "content": conv["chosen"]}]}
            reason = validate_messages(conv["messages"])
            if reason:
                counts.drop(f"format:{reason}")
                continue
            if excluded(first_user(conv["messages"])):
                counts.drop("heldout:eval_set")
                continue
            out.append(conv["messages"])
            if limit and len(out) >= limit:
                return out, counts
    return out, counts


def load_pairs(paths, counts: Counts | None = None, limit: int = 0) -> tuple[list[dict], Counts]:
    """Preference pairs {"prompt": messages, "chosen": str, "rejected": str}."""
    counts = counts or Counts()
    out = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(path)
        if not path.is_file():
            raise HerdError(f"{path}: preference data not found")
        for rec in _read_records(path, counts):
            counts.read += 1
            conv = to_conversation(rec)
            if conv is None or "prompt" not in conv:
                counts.drop("format:not_a_pair")
                continue
            reason = validate_pair(conv)
            if reason:
                counts.drop(f"format:{reason}")
                continue
            if excluded(first_user(conv["prompt"])):
                counts.drop("heldout:eval_set")
                continue
            out.append(conv)
            if limit and len(out) >= limit:
                return out, counts
    return out, counts


# --- formatting --------------------------------------------------------------------------------


def stop_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "stop_ids", ()) or ()) | (
        {tokenizer.eos_id} if getattr(tokenizer, "eos_id", None) is not None else set()
    )


def format_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in the model's chat template, and for each token whether it is an
    assistant token (its content and the end-of-turn token that closes it: what the model must learn
    to produce). The assistant spans are found by rendering prefixes: the template renders
    `messages[:i]` + generation prompt as a prefix of `messages[:i+1]`."""
    ids = tokenizer.encode_chat(messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    stops = stop_ids(tokenizer)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tokenizer.encode_chat(messages[:i], add_generation_prompt=True))
        upto = tokenizer.encode_chat(messages[: i + 1], add_generation_prompt=False)
        if upto != ids[: len(upto)] or start > len(upto):
            raise HerdError(f"chat template of {tokenizer.name}: a conversation prefix does not render as a prefix")
        end = len(upto)
        for j in range(start, end):  # stop after the end-of-turn token (ChatML's trailing newline is not learnt)
            mask[j] = True
            if ids[j] in stops:
                break
    return ids, mask


def format_prompt(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.encode_chat(messages, add_generation_prompt=True)


def format_response(tokenizer, prompt_ids: list[int], prompt_msgs: list[dict], response: str) -> list[int]:
    """Tokens of an assistant reply after `prompt_ids`, ending with the end-of-turn token."""
    full, mask = format_conversation(tokenizer, prompt_msgs + [{"role": "assistant", "content": response}])
    n = len(prompt_ids)
    if full[:n] != prompt_ids:
        raise HerdError(f"chat template of {tokenizer.name}: the prompt is not a prefix of the conversation")
    return [t for t, m in zip(full[n:], mask[n:]) if m]


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # loss on target ids[j] where mask[j]


def tokenize_conversations(tokenizer, convs: list[list[dict]], max_len: int, counts: Counts) -> list[Example]:
    out = []
    for msgs in convs:
        try:
            ids, mask = format_conversation(tokenizer, msgs)
        except HerdError:
            counts.drop("format:template")
            continue
        if len(ids) > max_len:
            counts.drop("length:over_context")
            continue
        if not any(mask[1:]):
            counts.drop("format:no_assistant_tokens")
            continue
        counts.kept += 1
        out.append(Example(ids, mask))
    return out


# --- packing ------------------------------------------------------------------------------------


def pack(examples: list[Example], seq_len: int, pad_id: int) -> list[tuple[list[int], list[int], list[bool]]]:
    """First-fit-decreasing packing into rows of seq_len tokens: (tokens, positions, loss mask).
    Positions restart at 0 per conversation (document masking); the tail of a row is a padding
    document (positions from 0, no loss). Conversations are never split across rows."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
    rows: list[list[int]] = []  # example indices per row
    space: list[int] = []
    for i in order:
        n = len(examples[i].ids)
        for r, free in enumerate(space):
            if free >= n:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(seq_len - n)
    out = []
    for members in sorted(rows, key=lambda m: min(m)):
        tok, pos, msk = [], [], []
        for i in sorted(members):
            e = examples[i]
            tok += e.ids
            pos += list(range(len(e.ids)))
            msk += e.mask
        pad = seq_len - len(tok)
        tok += [pad_id] * pad
        pos += list(range(pad))
        msk += [False] * pad
        out.append((tok, pos, msk))
    return out


def rows_to_batch(rows, weight: float):
    """Packed rows -> flows.train.data.Batch (inputs, positions, next-token targets, weights).
    A target counts when the *target* token is an assistant token of the same document."""
    from flows.train.data import Batch

    tok = torch.tensor([r[0] for r in rows], dtype=torch.long)
    pos = torch.tensor([r[1] for r in rows], dtype=torch.long)
    msk = torch.tensor([r[2] for r in rows], dtype=torch.bool)
    inputs, in_pos = tok[:, :-1], pos[:, :-1]
    targets = tok[:, 1:].clone()
    valid = msk[:, 1:] & (pos[:, 1:] > 0)
    targets[~valid] = IGNORE
    weights = valid.float() * weight
    return Batch(inputs.contiguous(), in_pos.contiguous(), targets, weights)
