"""Full (unsharded) state dicts of megatron-core models: tensors of the parameter table only."""

from __future__ import annotations

import torch

from mlmega.config.errors import ConfigError
from mlmega.config.model import ModelConfig
from mlmega.models.params import param_shapes

StateDict = dict[str, torch.Tensor]


def full_state_dict(model: torch.nn.Module) -> StateDict:
    """The model's parameters without ``_extra_state`` entries (TP=1, PP=1 models)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state") and v is not None}


def load_full_state_dict(model: torch.nn.Module, state: StateDict) -> None:
    """Load ``state`` into ``model``; everything but ``_extra_state`` must match exactly."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ConfigError(f"state dict does not fit the model: missing {missing}, "
                          f"unexpected {result.unexpected_keys}")


def check_state_dict(state: StateDict, cfg: ModelConfig, what: str = "state dict") -> None:
    """Raise unless ``state`` holds exactly the parameters of ``cfg`` with their global shapes."""
    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ConfigError(f"{what} does not match the model config ({cfg.source}): "
                          f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ConfigError(f"{what}: {name} has shape {tuple(state[name].shape)}, "
                              f"expected {shape} for the model config ({cfg.source})")
