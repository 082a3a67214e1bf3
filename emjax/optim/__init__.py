"""Optimisers as Optax transforms: config, registry, label tree, Muon.

    tx = emjax.optim.build(OptimConfig(name="muon", learning_rate=2e-4, total_steps=1000))
    opt_state = tx.init(trainable)            # trainable: nnx.State or nested dicts of LoRA factors
    updates, opt_state = tx.update(grads, opt_state, trainable)
    emjax.optim.current_lr(opt_state)
"""

from emjax.optim.build import (
    LABELS,
    LrSchedule,
    OptimConfig,
    available,
    build,
    current_lr,
    factory,
    labels,
    make_schedule,
    path_str,
    register,
    scale_by_path,
    schedule_value,
    validate,
)
from emjax.optim.muon import muon, newton_schulz, scale_by_muon, shape_scale

__all__ = [
    "LABELS",
    "LrSchedule",
    "OptimConfig",
    "available",
    "build",
    "current_lr",
    "factory",
    "labels",
    "make_schedule",
    "muon",
    "newton_schulz",
    "path_str",
    "register",
    "scale_by_muon",
    "scale_by_path",
    "schedule_value",
    "shape_scale",
    "validate",
]
