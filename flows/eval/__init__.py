"""The evaluation stage: tasks from spec files, KV-cache scoring, MLflow runs, registry and champion gate.

    from flows.eval import run_eval, register_model, promote, resolve_model_uri

Pure cores (tasks, scoring, runners, redteam, gate.decide) run without Ray or MLflow;
stage.run_eval records one MLflow run; registry holds the model registry; gate the noise-aware promotion gate;
lm_eval_adapter registers "herd" with lm-evaluation-harness (imported on demand).
"""

from __future__ import annotations

from flows.eval.gate import Decision, GateConfig, promote
from flows.eval.registry import register_model, resolve_model_uri
from flows.eval.stage import EvalResult, load_config, run_eval

__all__ = [
    "run_eval",
    "EvalResult",
    "load_config",
    "register_model",
    "promote",
    "resolve_model_uri",
    "GateConfig",
    "Decision",
]
