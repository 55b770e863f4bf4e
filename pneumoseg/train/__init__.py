"""Training (needs torch): one engine for the classifier and the segmenter, built-in recipes, kill-safe
checkpoints, multi-GPU with torchrun, and the winners' ensembling.

    from pneumoseg.train import load_recipe, train
    result = train(load_recipe("demo", data={"root": "siim-synthetic"}), "runs/demo")

The config and the recipes (``pneumoseg.train.config``) need only PyYAML; the rest loads on first use.
"""

from .config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    describe_config,
    list_recipes,
    load_config,
    load_recipe,
)

_LAZY = {
    "train": "engine", "Trainer": "engine", "TrainResult": "engine", "build_network": "engine", "Gate": "engine",
    "average_checkpoints": "ensemble", "recompute_batchnorm": "ensemble", "StackedClassifier": "ensemble",
    "fit_stacked_classifier": "ensemble",
    "load_checkpoint": "checkpoint", "checkpoint_state_dict": "checkpoint", "checkpoint_to_safetensors": "checkpoint",
    "ModelEMA": "ema", "DistributedRatioSampler": "distributed",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "TrainConfig", "load_config", "load_recipe", "list_recipes", "config_from_dict",
           "apply_overrides", "describe_config", *_LAZY]
