"""The data recipe: language quota and domain mix (flows/data/mixing.py), the domain classifier,
the filters' language and domain routing, and the embedded corpus' code and multilingual parts.

Fast tests run the pure cores on synthetic input; the integration test runs the flow on Ray;
the acceptance test measures bench/recipe on ../shared/data (skipped with a reason when absent).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.data.config import config_from_dict
from flows.data.mixing import MIX_REASON, NO_TARGET_REASON, QUOTA_REASON, Candidates, balance, even_split


def synthetic(seed: int = 0, n_en: int = 4000, others: dict[str, int] | None = None, n_code: int = 120) -> Candidates:
    """English and other-language documents in domains web/books, code documents with no language."""
    rng = np.random.default_rng(seed)
    others = others or {"de": 600, "fr": 300, "ja": 20, "sw": 3}
    lang = ["en"] * n_en + [code for code, n in others.items() for _ in range(n)] + ["und"] * n_code
    n = len(lang)
    domain = rng.choice(["web", "books"], size=n, p=[0.7, 0.3]).astype(object)
    domain[n - n_code :] = "code"
    return Candidates(
        seq=np.arange(n, dtype=np.int64) * 7,
        key=rng.integers(0, 2**63, n).astype(np.uint64),
        lang=np.array(lang, dtype=object),
        domain=domain,
        tokens=rng.integers(20, 3000, n),
    )


def test_even_split_caps_by_availability():
    assert even_split(10, {"a": 1, "b": 50, "c": 50}) == {"a": 1, "b": 5, "c": 4}
    assert even_split(9, {"a": 3, "b": 3, "c": 3}) == {"a": 3, "b": 3, "c": 3}
    assert even_split(100, {"a": 2, "b": 7}) == {"a": 2, "b": 7}
    assert even_split(0, {"a": 2}) == {"a": 0}


@pytest.mark.parametrize("share", [0.05, 0.08, 0.15])
def test_quota_holds_the_share_and_splits_evenly(share):
    c = synthetic()
    reasons, rep = balance(c, "en", share, {})
    kept = reasons == ""
    q = rep["quota"]
    other = kept & (c.lang != "en") & (c.lang != "und")
    achieved = other.sum() / (kept & (c.lang != "und")).sum()
    print(
        f"quota {share}: kept non-English share {achieved:.4f} ({other.sum()} documents), by language "
        f"{ {k: v['documents'] for k, v in rep['languages'].items()} }"
    )
    assert abs(achieved - share) < 0.005 and q["share_documents"] == pytest.approx(achieved, abs=1e-5)
    assert not q["short"]
    # Every English and code document is kept; every drop is the quota's, counted per language.
    assert kept[c.lang == "en"].all() and kept[c.lang == "und"].all()
    assert set(reasons[~kept]) == {QUOTA_REASON}
    assert sum(v["dropped_quota"] for v in rep["languages"].values()) == (~kept).sum() == q["dropped"]
    assert set(rep["languages"]) == {"en", "de", "fr", "ja", "sw", "und"}
    # Even split capped by availability: sw keeps all 3, the rest within one document of each other.
    n = {c: rep["languages"][c]["documents"] for c in ("de", "fr", "ja", "sw")}
    assert n["sw"] == 3
    big = [n[c] for c in ("de", "fr", "ja") if n[c] < {"de": 600, "fr": 300, "ja": 20}[c]]
    assert max(big) - min(big) <= 1
    # Tokens are reported, and add up.
    assert sum(v["tokens"] for v in rep["languages"].values()) == int(c.tokens[kept].sum())


def test_quota_is_deterministic_and_short_when_scarce():
    c = synthetic()
    a, _ = balance(c, "en", 0.05, {})
    b, _ = balance(c, "en", 0.05, {})
    assert (a == b).all()
    scarce = synthetic(others={"de": 10})
    reasons, rep = balance(scarce, "en", 0.05, {})
    assert (reasons == "").all() and rep["quota"]["short"]
    assert rep["quota"]["share_documents"] < 0.05


@pytest.mark.parametrize("targets", [{"web": 0.6, "books": 0.3, "code": 0.1}, {"web": 0.2, "books": 0.5, "code": 0.3}])
def test_mix_and_quota_together_hit_both_targets(targets):
    c = synthetic()
    reasons, rep = balance(c, "en", 0.05, targets)
    kept = reasons == ""
    total = c.tokens[kept].sum()
    for d, w in targets.items():
        share = c.tokens[kept & (c.domain == d)].sum() / total
        print(f"{d}: target {w}, achieved {share:.4f}")
        assert abs(share - w) < 0.01
        assert rep["mix"]["domains"][d]["share"] == pytest.approx(share, abs=1e-4)
    other = kept & (c.lang != "en") & (c.lang != "und")
    assert abs(other.sum() / (kept & (c.lang != "und")).sum() - 0.05) < 0.005
    assert set(reasons[~kept]) <= {QUOTA_REASON, MIX_REASON}
    # Documents dropped by the mix are counted per domain; nothing is repeated.
    assert sum(v["dropped"] for v in rep["mix"]["domains"].values()) == (reasons == MIX_REASON).sum()
    assert all(v["epochs"] == 1 for v in rep["mix"]["domains"].values())


def test_mix_drops_domains_without_a_target_and_renormalises():
    c = synthetic(others={})
    reasons, rep = balance(c, "en", None, {"web": 2.0, "books": 1.0, "math": 1.0})
    kept = reasons == ""
    assert (reasons[c.domain == "code"] == NO_TARGET_REASON).all()
    share = c.tokens[kept & (c.domain == "web")].sum() / c.tokens[kept].sum()
    assert abs(share - 2 / 3) < 0.01  # math is absent: its target is spread over the others
    assert rep["mix"]["domains"]["math"]["documents"] == 0


def test_domain_classifier():
    from flows.data.domains import classify_domain

    code = "import os\n\ndef f(x):\n    y = x + 1\n    return y\n\nclass A:\n    pass\n"
    assert classify_domain(code) == "code"
    prose = "The function returns a value.\nIt is useful in many cases, as shown below.\n" * 3 + ">>> f(1)\n2\n"
    assert classify_domain(prose) == "general"
    math = "Let $x$ be real. Then \\frac{a}{b} = 3 + 4 and 2 * 5 = 10, so \\sqrt{x} \\leq 1."
    assert classify_domain(math) == "math"


def test_domains_from_sources_and_routing(tmp_path):
    """A named source gives its domain; code skips language ID and the prose filters; a
    non-English document skips langid.primary_only but is identified and kept."""
    from flows.data.domains import DomainResolver
    from flows.data.stages import FilterStage

    (tmp_path / "src").mkdir()
    cfg = config_from_dict(
        {
            "input": {
                "paths": [str(tmp_path / "src"), str(tmp_path / "b.jsonl")],
                "domains": {str(tmp_path / "src"): "code"},
            },
            "langid": {"keep": ["en", "de"]},
            "minhash": {"enabled": False},
        }
    )
    resolve = DomainResolver(cfg.input, cfg.mix)
    assert resolve(str(tmp_path / "src" / "a" / "x.jsonl"), "x", "plain words") == "code"
    assert resolve(str(tmp_path / "b.jsonl"), "x", "plain words") == "general"
    assert resolve("", "lang:de:001", "x") == "general" and resolve("", "code:os.py", "x") == "code"

    german = (
        "Die Stadt liegt am Fluss und hat viele alte Häuser. Im Sommer kommen viele Besucher, "
        "die durch die engen Gassen laufen. Das Museum zeigt Bilder aus dem Mittelalter. "
        "Am Abend sitzen die Leute in den Cafés am Marktplatz und reden über das Wetter."
    )
    code = "import os\n\ndef f(x):\n    y = x + 1\n    return y\n\nclass Len:\n    kill = strip = 1\n"
    batch = {
        "seq": [0, 1],
        "id": ["de", "code"],
        "text": [german, code],
        "reason": ["", ""],
        "source": [str(tmp_path / "b.jsonl"), str(tmp_path / "src" / "m.py")],
    }
    out = FilterStage(cfg)(batch)
    assert list(out["reason"]) == ["", ""]  # C4/Gopher quality would drop both (too short, English stop words)
    assert list(out["lang"]) == ["de", "und"] and list(out["domain"]) == ["general", "code"]


def test_config_errors_name_the_key():
    from model.errors import HerdError

    with pytest.raises(HerdError, match="input.domains names a path not in input.paths: nope"):
        config_from_dict({"input": {"paths": ["a"], "domains": {"nope": "code"}}})
    with pytest.raises(HerdError, match="mix.targets"):
        config_from_dict({"mix": {"targets": {"web": -1}}})
    with pytest.raises(HerdError, match="quota_share"):
        config_from_dict({"langid": {"quota_share": 1.5}})
    with pytest.raises(HerdError, match="primary_only: unknown filter"):
        config_from_dict({"langid": {"primary_only": ["gopher"]}})


def test_embedded_corpus_has_code_and_other_languages():
    from flows.data.config import EmbeddedConfig
    from flows.data.embedded import SAMPLE, code_files, embedded_documents

    cfg = EmbeddedConfig(code_files=16)
    files = code_files(cfg)
    assert len(files) == 16 and files == code_files(cfg) and SAMPLE.stat().st_size < 300_000
    # The last of 16 parts (a sixteenth of the docstring parse, to keep this fast).
    ids = [doc_id for doc_id, _ in embedded_documents(15, 16, cfg)]
    assert sum(i.startswith("code:") for i in ids) == 1
    langs = {i.split(":")[1] for i in ids if i.startswith("lang:")}
    assert len(langs) == 20 and "en" not in langs
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    assert all(r["id"].startswith(f"lang:{r['lang']}:") for r in rows)


@pytest.mark.integration
def test_flow_packs_the_mix_and_holds_the_quota(tmp_path):
    """On Ray: English prose, ten languages of the committed sample and stdlib modules (a source
    named `code`); the packed token stream's domain shares are within 1 point of the targets, the
    quota holds, every language is reported, and kept + dropped = input."""
    import ray

    from flows.data.embedded import SAMPLE, _root, stdlib_files
    from flows.data.pipeline import run_prep
    from flows.data.shards import token_stream
    from model.tokenizer import load_tokenizer
    from tests.test_data_pipeline import english_docs

    good, bad = english_docs()
    sample = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    langs = sorted({r["lang"] for r in sample})[:10]
    other = [r for r in sample if r["lang"] in langs]
    prose = tmp_path / "prose.jsonl"
    prose.write_text(
        "".join(json.dumps({"id": f"en{i}", "text": t}) + "\n" for i, t in enumerate(good + bad))
        + "".join(json.dumps({"id": r["id"], "text": r["text"]}, ensure_ascii=False) + "\n" for r in other)
    )
    code = tmp_path / "code"
    code.mkdir()
    small = [f for f in stdlib_files() if 800 <= f.stat().st_size <= 3000][:60]
    for f in small:
        (code / (f.relative_to(_root()).as_posix().replace("/", "_") + ".txt")).write_text(
            f.read_text(encoding="utf-8")
        )
    targets = {"general": 0.75, "code": 0.25}
    cfg = config_from_dict(
        {
            "name": "recipe",
            "input": {"paths": [str(prose), str(code)], "domains": {str(code): "code"}},
            "langid": {"keep": ["en"] + langs, "quota_share": 0.1},
            "semdedup": {"enabled": False},
            "quality": {"enabled": False},
            "pack": {"seq_len": 256, "sequences_per_shard": 64, "validation_fraction": 0.0},
            "mix": {"targets": targets},
            "output": {"write_documents": True},
            "ray": {"num_cpus": 2, "batch_size": 32, "progress_bars": False},
            "mlflow": {"enabled": False},
        }
    )
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report, _ = run_prep(cfg, tmp_path / "out")
    finally:
        if started:
            ray.shutdown()
    n_input = len(good) + len(bad) + len(other) + len(small)
    assert report["input_documents"] == n_input and report["kept"] + report["dropped"] == n_input
    kept = [
        json.loads(line) for line in (tmp_path / "out" / "documents.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    tok = load_tokenizer("llama3")
    tokens = {d: 0 for d in targets}
    for doc in kept:
        tokens[doc["domain"]] += len(tok.encode(doc["text"], eos=True))
    stream = len(token_stream(tmp_path / "out", "train"))
    assert sum(tokens.values()) == stream
    shares = {d: tokens[d] / stream for d in targets}
    print(
        f"packed {stream} tokens; domain shares {shares}; quota {report['quota']}; dropped "
        f"{report['dropped_by_reason']}"
    )
    for d, w in targets.items():
        assert abs(shares[d] - w) < 0.01, (d, shares[d])
        assert report["mix"]["domains"][d]["tokens"] == tokens[d]
    q = report["quota"]
    # Forty-odd English documents: the share can be no closer than one document in.
    one_doc = 1 / (report["languages"]["en"]["documents"] + q["other_documents"])
    assert abs(q["share_documents"] - 0.1) <= one_doc and q["other_documents"] == q["goal_documents"] and not q["short"]
    assert set(langs) <= set(report["languages"]) and "en" in report["languages"]
    kept_by_lang = [report["languages"][lang]["documents"] for lang in langs]
    assert all(report["languages"][lang]["identified"] >= 1 for lang in langs)
    assert max(kept_by_lang) - min(kept_by_lang) <= 1 and sum(kept_by_lang) == q["other_documents"]  # an even split
    assert (
        report["dropped_by_reason"].get("mix:over_share", 0) > 0
        and report["dropped_by_reason"].get("quota:over_share", 0) > 0
    )


@pytest.mark.acceptance
def test_recipe_on_shared_data():
    """bench/recipe on ../shared/data: the kept non-English share within 0.5 points of 5%, every
    language of the input reported, kept + dropped = input, the domain shares within 1 point."""
    from bench.recipe import SENTENCES, run

    if not SENTENCES.is_dir():
        pytest.skip(f"{SENTENCES} is absent (../shared/data not on this machine)")
    from bench.recipe import MIX

    for mix in (None, MIX):
        f = run(0.05, mix)
        print(json.dumps({k: v for k, v in f.items() if k != "languages"}, indent=1))
        assert f["share_error_points"] <= 0.5
        assert set(f["languages_in_input"]) <= set(f["languages_reported"])
        assert f["kept"] + f["dropped"] == f["input_documents"]
        if mix:
            assert f["mix_error_points"] <= 1.0
        else:  # the quota alone: every language keeps documents
            assert all(f["languages"][lang]["documents"] > 0 for lang in f["languages_in_input"])
