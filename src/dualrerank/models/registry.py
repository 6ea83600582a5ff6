"""Model registry: one dict from model name to (model class, config class, kind).

Checkpoints, the CLI and the training code find models here by name; nothing dispatches
on a name with if/elif. Classes are imported lazily (`module:Class` paths resolved with
importlib) so that importing the registry does not import every model (nor LightGBM or
CatBoost).

Kinds:
    "ar"         autoregressive list generator (teacher, Seq2Slate)
    "nar"        non-autoregressive list generator (student)
    "evaluator"  list-wise evaluator (predicts per-position feedback of a page)
    "scorer"     score-and-sort nn.Module (DNN, PRM, upstream sort)
    "tree"       gradient-boosted ranker (not an nn.Module; `fit(train, valid)`, saved as its
                 library's own model file: LightGBM's text file, CatBoost's .cbm)

`objective_defaults` are training-objective settings an entry implies without any model
difference: Seq2Slate is the AR teacher trained with `bpr_weight = 0` (the trainer's
`GeneratorObjectiveConfig`), i.e. MLE only.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dualrerank.config import from_dict
from dualrerank.errors import ConfigError

__all__ = ["ModelSpec", "MODELS", "get_spec", "build_model", "default_config", "config_from_dict", "set_data_dims"]


@dataclass(frozen=True)
class ModelSpec:
    """Where a model lives and what it is."""

    model: str  # "package.module:ClassName"
    config: str  # "package.module:ConfigClassName"
    kind: str
    objective_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model_class(self) -> type[Any]:
        return _resolve(self.model)

    @property
    def config_class(self) -> type:
        return _resolve(self.config)


def _resolve(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_T = "dualrerank.models.teacher"
_S = "dualrerank.models.student"
_E = "dualrerank.models.evaluator"
_B = "dualrerank.models.baselines"

MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        "teacher": ModelSpec(f"{_T}:ARTeacher", f"{_T}:TeacherConfig", "ar"),
        "seq2slate": ModelSpec(f"{_T}:ARTeacher", f"{_T}:TeacherConfig", "ar", MappingProxyType({"bpr_weight": 0.0})),
        "student": ModelSpec(f"{_S}:NARStudent", f"{_S}:StudentConfig", "nar"),
        "nar": ModelSpec(f"{_S}:NARStudent", f"{_S}:StudentConfig", "nar"),
        "evaluator": ModelSpec(f"{_E}:ListEvaluator", f"{_E}:EvaluatorConfig", "evaluator"),
        "dnn": ModelSpec(f"{_B}:PointwiseDNN", f"{_B}:DNNConfig", "scorer"),
        "prm": ModelSpec(f"{_B}:PRM", f"{_B}:PRMConfig", "scorer"),
        "upstream": ModelSpec(f"{_B}:UpstreamSort", f"{_B}:UpstreamConfig", "scorer"),
        "lambdamart": ModelSpec(f"{_B}:LambdaMART", f"{_B}:LambdaMARTConfig", "tree"),
        "catboost": ModelSpec(f"{_B}:CatBoostRank", f"{_B}:CatBoostConfig", "tree"),
    }
)


def get_spec(name: str) -> ModelSpec:
    """The registry entry of `name`; `ConfigError` listing the known names otherwise."""
    if not isinstance(name, str) or name not in MODELS:
        raise ConfigError(f"model: unknown name {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def default_config(name: str) -> Any:
    """A default config instance for model `name`."""
    return get_spec(name).config_class()


def config_from_dict(name: str, data: Mapping[str, Any]) -> Any:
    """Model `name`'s config from a plain dict (unknown keys / bad types -> `ConfigError`)."""
    return from_dict(get_spec(name).config_class, dict(data), where=f"{name} config")


def build_model(name: str, config: Any = None) -> Any:
    """Instantiate model `name` from `config` (a config instance, a dict, or None = defaults)."""
    spec = get_spec(name)
    cls = spec.config_class
    if config is None:
        config = cls()
    elif isinstance(config, Mapping):
        config = config_from_dict(name, config)
    elif not isinstance(config, cls):
        raise ConfigError(f"model {name!r}: expected a {cls.__name__}, got {type(config).__name__}")
    return spec.model_class(config)


def set_data_dims(config: Any, candidate_dim: int, context_dim: int) -> Any:
    """A copy of `config` with the data's feature widths set wherever the config keeps them
    (its `encoder` sub-config, or its own `candidate_dim` / `context_dim` fields)."""
    dims = {"candidate_dim": candidate_dim, "context_dim": context_dim}
    names = {f.name for f in dataclasses.fields(config)}
    changes: dict[str, Any] = {k: v for k, v in dims.items() if k in names}
    if "encoder" in names:
        changes["encoder"] = dataclasses.replace(config.encoder, **dims)
    return dataclasses.replace(config, **changes)
