"""Models: shared encoder and layers, AR teacher, NAR student, list-wise evaluator, baselines.

Names are resolved lazily so that `import dualrerank.models` imports neither every model
nor LightGBM and CatBoost; `dualrerank.models.registry` maps model names to classes and configs, and
`dualrerank.models.checkpoint` saves and loads them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "EncoderConfig": "dualrerank.models.encoder",
    "CandidateEncoder": "dualrerank.models.encoder",
    "ARTeacher": "dualrerank.models.teacher",
    "TeacherConfig": "dualrerank.models.teacher",
    "NARStudent": "dualrerank.models.student",
    "StudentConfig": "dualrerank.models.student",
    "ListEvaluator": "dualrerank.models.evaluator",
    "EvaluatorConfig": "dualrerank.models.evaluator",
    "UpstreamSort": "dualrerank.models.baselines",
    "UpstreamConfig": "dualrerank.models.baselines",
    "PointwiseDNN": "dualrerank.models.baselines",
    "DNNConfig": "dualrerank.models.baselines",
    "PRM": "dualrerank.models.baselines",
    "PRMConfig": "dualrerank.models.baselines",
    "LambdaMART": "dualrerank.models.baselines",
    "LambdaMARTConfig": "dualrerank.models.baselines",
    "CatBoostRank": "dualrerank.models.baselines",
    "CatBoostConfig": "dualrerank.models.baselines",
    "CATBOOST_LOSSES": "dualrerank.models.baselines",
    "MODELS": "dualrerank.models.registry",
    "build_model": "dualrerank.models.registry",
    "default_config": "dualrerank.models.registry",
    "set_data_dims": "dualrerank.models.registry",
    "save_checkpoint": "dualrerank.models.checkpoint",
    "load_checkpoint": "dualrerank.models.checkpoint",
    "read_checkpoint_info": "dualrerank.models.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dualrerank.models' has no attribute {name!r}")


__all__ = sorted(_LAZY)
