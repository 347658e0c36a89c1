"""l2o-dynamics: meta-train a learned optimizer and study how it trains networks."""

from l2o.lstm import LSTMOptimizer
from l2o.optimizees import MLPOptimizee
from l2o.optimizers import SGD, Adam, Lion, LionSGD, Optimizer, make_baseline, replay

__all__ = [
    "LSTMOptimizer",
    "MLPOptimizee",
    "Optimizer",
    "SGD",
    "Adam",
    "Lion",
    "LionSGD",
    "make_baseline",
    "replay",
]
