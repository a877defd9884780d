"""Pretraining (issue #4): the plain-torch core and its Ray Train driver.

from flows.train import run_pretrain
result = run_pretrain("configs/pretrain/default.yaml", data_dir="data/packed")
result.model_dir, result.metrics, result.mlflow_run_id
"""

from flows.train.config import PretrainConfig, config_from_dict, load_config


def run_pretrain(config, **kwargs):
    from flows.train.ray_trainer import run_pretrain as _run

    return _run(config, **kwargs)


__all__ = ["PretrainConfig", "config_from_dict", "load_config", "run_pretrain"]
