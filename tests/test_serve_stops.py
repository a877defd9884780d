"""Stop strings: the Aho-Corasick matcher against a brute-force search."""

from __future__ import annotations

import random

import pytest

from services.engine.sequence import Detokenizer


def brute_force(chunks: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    """What a client sees: the text up to the earliest match among those ending in the first chunk that
    completes one (the old quadratic rule), and whether it stopped."""
    text = ""
    for chunk in chunks:
        before, text = len(text), text + chunk
        starts = [
            i for s in stops for i in range(len(text) - len(s) + 1) if text.startswith(s, i) and i + len(s) > before
        ]
        if starts:
            return text[: min(starts)], True
    return text, False


def run(chunks: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    d = Detokenizer(None, stops)
    shown = ""
    for chunk in chunks:
        new, stopped = add_chunk(d, chunk)
        shown += new
        if stopped:
            return shown, True
        # held back: exactly the longest end of the text that may still begin a stop string
        held = d.text[len(shown) :]
        assert d.text.startswith(shown)
        assert max(
            (n for n in range(len(d.text) + 1) for s in stops if n < len(s) and d.text.endswith(s[:n])), default=0
        ) == len(held), (d.text, shown, stops)
    return shown + d.flush(), False


def add_chunk(d: Detokenizer, chunk: str):
    """Feed `chunk` as one token's text."""

    class One:
        def decode_bytes(self, ids):
            return chunk.encode()

    d.tokenizer = One()
    return d.add(0)


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 2 else "abc"
    stops = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 6))})
    chunks = ["".join(rng.choice(alphabet + "xy") for _ in range(rng.randint(1, 4))) for _ in range(30)]
    assert run(chunks, stops) == brute_force(chunks, stops)


def test_holds_back_a_partial_stop_string():
    d = Detokenizer(None, ("END", "NDX"))
    assert add_chunk(d, "abc EN") == ("abc ", False)  # " EN" may begin "END"
    assert add_chunk(d, "Q") == ("ENQ", False)
    assert add_chunk(d, "EN") == ("", False)
    assert add_chunk(d, "D and more") == ("", True)
    assert d.text == "abc ENQ"
