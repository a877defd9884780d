"""The promotion gate: a candidate replaces the champion only on evidence, not on noise.

A candidate is promoted only if every check passes:

  benchmark   each configured metric, and each of its subsets (`<task>/<subset>/<name>` beside
              `<task>/<name>`), is not worse than the champion's beyond the noise of the two
              measurements: for a proportion with its count (`<task>/n`, `<task>/<subset>/n`) the
              allowed drop is z * sqrt(se_cand^2 + se_champ^2) (+ `tolerance`); subsets share one
              family-wise error rate (Bonferroni), so 57 MMLU subjects do not reject an equal model
              by chance; a metric without a count allows `tolerance` only;
  win_rate    the lower bound of the candidate's pairwise win rate against the champion
              (`<metric>_lo`, a bootstrap 95% bound) is above `floor` (0.5: evidence it is better);
  attack      the red team's attack success rate (lower is better, a proportion with its count)
              is not worse beyond its interval;
  floors      absolute bounds every candidate must meet; they are all the first candidate faces.

Comparisons need the same evaluation: when the champion's `eval.config_hash` differs from the
candidate's, the champion is evaluated again under the candidate's config first (`evaluate_champion`)
and its new numbers replace its old ones in the registry. Every number the gate used and its
decision are recorded on the candidate version (flows/eval/registry.record_decision).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist

from model.errors import HerdError

GATE_KEYS = {"benchmarks", "subsets", "win_rate", "attack_success", "floors", "z"}


@dataclass(frozen=True)
class Benchmark:
    metric: str
    higher_is_better: bool = True
    tolerance: float = 0.0  # a drop allowed beyond the noise (for metrics without a count, the only allowance)


@dataclass(frozen=True)
class Floor:
    metric: str
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class GateConfig:
    benchmarks: tuple[Benchmark, ...] = ()
    subsets: bool = True
    win_rate: str | None = None  # e.g. humaneval/win_rate (its lower bound is <metric>_lo)
    win_floor: float = 0.5
    attack_success: str | None = None  # e.g. redteam/attack_success_rate (its count is <task>/n)
    floors: tuple[Floor, ...] = ()
    z: float = 1.96

    @classmethod
    def parse(cls, raw: dict | None) -> GateConfig:
        """The eval config's `gate:` section."""
        raw = raw or {}
        if not isinstance(raw, dict):
            raise HerdError(f"gate: expected a mapping, got {raw!r}")
        unknown = set(raw) - GATE_KEYS
        if unknown:
            raise HerdError(f"gate: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(GATE_KEYS))}")
        benches = []
        for b in raw.get("benchmarks") or []:
            b = {"metric": b} if isinstance(b, str) else b
            if not isinstance(b, dict) or "metric" not in b or set(b) - {"metric", "higher_is_better", "tolerance"}:
                raise HerdError(f"gate.benchmarks entry {b!r}: needs 'metric' (optional higher_is_better, tolerance)")
            benches.append(
                Benchmark(str(b["metric"]), bool(b.get("higher_is_better", True)), float(b.get("tolerance", 0.0)))
            )
        floors = []
        for f in raw.get("floors") or []:
            if (
                not isinstance(f, dict)
                or "metric" not in f
                or set(f) - {"metric", "min", "max"}
                or not ({"min", "max"} & set(f))
            ):
                raise HerdError(f"gate.floors entry {f!r}: needs 'metric' and 'min' and/or 'max'")
            floors.append(Floor(str(f["metric"]), _opt(f.get("min")), _opt(f.get("max"))))
        wr = raw.get("win_rate") or {}
        if wr and (not isinstance(wr, dict) or "metric" not in wr or set(wr) - {"metric", "floor"}):
            raise HerdError(f"gate.win_rate {wr!r}: needs 'metric' (optional floor)")
        z = float(raw.get("z", 1.96))
        if not z > 0:
            raise HerdError(f"gate.z must be > 0, got {z}")
        cfg = cls(
            tuple(benches),
            bool(raw.get("subsets", True)),
            wr.get("metric") if wr else None,
            float(wr.get("floor", 0.5)) if wr else 0.5,
            raw.get("attack_success"),
            tuple(floors),
            z,
        )
        if not (cfg.benchmarks or cfg.win_rate or cfg.attack_success or cfg.floors):
            raise HerdError("gate: nothing to check (configure benchmarks, win_rate, attack_success or floors)")
        return cfg


def _opt(v) -> float | None:
    return None if v is None else float(v)


@dataclass(frozen=True)
class Check:
    name: str  # the metric checked
    kind: str  # benchmark | subset | win_rate | attack | floor
    passed: bool
    candidate: float | None
    champion: float | None = None
    bound: float | None = None  # the allowed drop (benchmark, subset, attack) or the floor
    text: str = ""


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    candidate_version: str | None = None
    champion_version: str | None = None
    champion_reevaluated: bool = False
    checks: tuple[Check, ...] = field(default_factory=tuple)


def count_of(metrics: dict[str, float], metric: str) -> float | None:
    """The sample count beside a metric: `task/acc` -> `task/n`, `task/sub/acc` -> `task/sub/n`."""
    head = metric.rsplit("/", 1)[0]
    n = metrics.get(f"{head}/n")
    return n if n and n > 0 else None


def stderr(metrics: dict[str, float], metric: str) -> float | None:
    """Standard error of a proportion metric (None: not a proportion with a count)."""
    p, n = metrics.get(metric), count_of(metrics, metric)
    if p is None or n is None or not 0.0 <= p <= 1.0:
        return None
    # a floor of one event in n+1 keeps 0% and 100% from claiming zero noise
    q = min(max(p, 1.0 / (n + 1)), n / (n + 1))
    return math.sqrt(q * (1 - q) / n)


def subsets_of(metrics: dict[str, float], metric: str) -> list[str]:
    task, name = metric.split("/", 1) if "/" in metric else ("", metric)
    return sorted(k for k in metrics if k.count("/") == 2 and k.startswith(task + "/") and k.endswith("/" + name))


def _compare(name: str, kind: str, cand: dict, champ: dict, higher: bool, tolerance: float, z: float) -> Check:
    c, h = cand.get(name), champ.get(name)
    if c is None and h is None:
        return Check(name, kind, True, None, None, text=f"{name}: not measured by this eval config")
    if c is None:
        return Check(name, kind, False, None, h, text=f"{name}: the candidate has none")
    if h is None:
        return Check(name, kind, True, c, None, text=f"{name} {c:.4f} (the champion has none)")
    se_c, se_h = stderr(cand, name), stderr(champ, name)
    noise = z * math.sqrt(se_c**2 + se_h**2) if se_c is not None and se_h is not None else 0.0
    allowed = noise + tolerance
    gain = (c - h) if higher else (h - c)
    ok = gain >= -allowed
    return Check(
        name,
        kind,
        ok,
        c,
        h,
        allowed,
        f"{name} {c:.4f} vs {h:.4f} ({'higher' if higher else 'lower'} is better; gain {gain:+.4f}, "
        f"{'within' if ok else 'beyond'} the allowed drop {allowed:.4f})",
    )


def decide(
    candidate: dict[str, float], champion: dict[str, float] | None, cfg: GateConfig
) -> tuple[bool, str, list[Check]]:
    """Pure decision: (promote?, reason, checks). `champion` None: the first candidate, floors only."""
    checks = []
    for f in cfg.floors:
        v = candidate.get(f.metric)
        ok = v is not None and (f.min is None or v >= f.min) and (f.max is None or v <= f.max)
        bound = f.min if f.min is not None else f.max
        rng = " and ".join(
            s for s in (f"min {f.min}" if f.min is not None else "", f"max {f.max}" if f.max is not None else "") if s
        )
        checks.append(
            Check(
                f.metric,
                "floor",
                ok,
                v,
                None,
                bound,
                f"{f.metric} {'missing' if v is None else f'{v:.4f}'} ({rng}: {'met' if ok else 'not met'})",
            )
        )
    if champion is not None:
        for b in cfg.benchmarks:
            checks.append(_compare(b.metric, "benchmark", candidate, champion, b.higher_is_better, b.tolerance, cfg.z))
            subs = subsets_of(candidate, b.metric) if cfg.subsets else []
            if subs:
                z_sub = NormalDist().inv_cdf(1 - (1 - NormalDist().cdf(cfg.z)) / len(subs))  # Bonferroni
                checks += [
                    _compare(s, "subset", candidate, champion, b.higher_is_better, b.tolerance, z_sub) for s in subs
                ]
        if cfg.win_rate:
            lo, wr = candidate.get(cfg.win_rate + "_lo"), candidate.get(cfg.win_rate)
            ok = lo is not None and lo > cfg.win_floor
            checks.append(
                Check(
                    cfg.win_rate,
                    "win_rate",
                    ok,
                    wr,
                    None,
                    cfg.win_floor,
                    f"{cfg.win_rate}: no win rate against the champion"
                    if lo is None
                    else f"{cfg.win_rate} {wr:.4f}, lower bound {lo:.4f} "
                    f"{'>' if ok else '<='} floor {cfg.win_floor:.4f}",
                )
            )
        if cfg.attack_success:
            checks.append(_compare(cfg.attack_success, "attack", candidate, champion, False, 0.0, cfg.z))
    if not checks:
        return True, "no champion and no floors: the candidate becomes champion", []
    ok = all(c.passed for c in checks)
    failed = [c for c in checks if not c.passed]
    head = ("promoted" if ok else "not promoted") + ("" if champion is not None else " (first candidate: floors only)")
    shown = failed or [c for c in checks if c.kind != "subset"]
    more = len(checks) - len(shown)
    return (
        ok,
        f"{head}: " + "; ".join(c.text for c in shown) + (f"; {more} more check(s) passed" if more else ""),
        checks,
    )


def promote(
    name: str,
    cfg: GateConfig,
    *,
    candidate_metrics: dict[str, float] | None = None,
    config_hash: str | None = None,
    evaluate_champion: Callable[[str], tuple[dict[str, float], str]] | None = None,
    tracking_uri: str | None = None,
) -> Decision:
    """Gate the `candidate` version against the `champion`; move `champion` only if it passes.

    candidate_metrics/config_hash default to the candidate version's tags. When the champion's
    config hash differs, `evaluate_champion(models:/NAME/VERSION)` -> (metrics, config_hash)
    re-measures it first (without it, a mismatch is an error rather than a comparison)."""
    from mlflow.exceptions import MlflowException

    from flows.eval.registry import CANDIDATE, CHAMPION, record_decision, record_metrics, version_metrics
    from flows.tracking import client as mlflow_client

    client = mlflow_client(tracking_uri)
    try:
        cand = client.get_model_version_by_alias(name, CANDIDATE)
    except MlflowException:
        raise HerdError(f"models:/{name}@{CANDIDATE}: no such version to promote") from None
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champ = None
    if champ is not None and champ.version == cand.version:
        return Decision(False, f"version {cand.version} is already {CHAMPION}", str(cand.version), str(champ.version))
    cmetrics = candidate_metrics if candidate_metrics is not None else version_metrics(cand)
    chash = config_hash or (cand.tags or {}).get("eval.config_hash")
    hmetrics, reevaluated = None, False
    if champ is not None:
        hmetrics = version_metrics(champ)
        old_hash = (champ.tags or {}).get("eval.config_hash")
        if old_hash != chash:
            if evaluate_champion is None:
                raise HerdError(
                    f"champion v{champ.version} was evaluated under config {old_hash}, the candidate under "
                    f"{chash}: re-evaluate the champion first"
                )
            hmetrics, new_hash = evaluate_champion(f"models:/{name}/{champ.version}")
            if new_hash != chash:
                raise HerdError(f"champion v{champ.version} re-evaluated under config {new_hash}, expected {chash}")
            record_metrics(name, champ.version, hmetrics, new_hash, tracking_uri)
            reevaluated = True
    ok, reason, checks = decide(cmetrics, hmetrics, cfg)
    versus = f"v{cand.version} vs {CHAMPION} v{champ.version}" if champ is not None else f"v{cand.version}"
    reason = f"{versus}: {reason}" + (" (champion re-evaluated under this eval config)" if reevaluated else "")
    numbers = {
        f"gate.{c.kind}.{c.name}": json.dumps(
            {"passed": c.passed, "candidate": c.candidate, "champion": c.champion, "bound": c.bound}
        )
        for c in checks
    }
    record_decision(
        name,
        cand.version,
        ok,
        reason,
        {**numbers, "gate.champion_reevaluated": str(reevaluated).lower(), "gate.config_hash": str(chash)},
        None if champ is None else champ.version,
        tracking_uri,
    )
    return Decision(
        ok, reason, str(cand.version), None if champ is None else str(champ.version), reevaluated, tuple(checks)
    )
