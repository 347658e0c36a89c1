"""l2o-dynamics: meta-train a learned optimizer and study how it trains networks."""

from l2o.dropin import LearnedOptimizer
from l2o.lstm import LSTMOptimizer
from l2o.mlp_lopt import MLPLOpt
from l2o.optimizees import MLPOptimizee
from l2o.optimizers import SGD, Adam, Lion, LionSGD, Optimizer, make_baseline, replay

__all__ = [
    "LearnedOptimizer",
    "LSTMOptimizer",
    "MLPLOpt",
    "MLPOptimizee",
    "Optimizer",
    "SGD",
    "Adam",
    "Lion",
    "LionSGD",
    "make_baseline",
    "replay",
]
