"""Lightning callbacks that analyse a meta-test run step by step, one analysis per file.

Attach any of them, alone or together, to ``Trainer(inference_mode=False, ...).test(
MetaTestSystem(...), datamodule=MetaTestData(...))``; ``evaluate.py`` takes them as config
objects (``--analyses``, default list: ``configs/analyses.yaml``). Each logs under its ``name``:

=====================  ===============  ==============  ==========================================
callback               name (prefix)    every_n_steps   what
=====================  ===============  ==============  ==========================================
``SymmetryBreaking``   ``symmetry``     1               symmetry deviations of update, gradient
``TailIndex``          ``tail_index``   10              alpha of minibatch gradient/update noise
``UpdateCovariance``   ``covariance``   50              top eigenvalue, trace of update/grad cov.
``UpdateHistograms``   ``update_hist``  50              distribution of log10 |update|
=====================  ===============  ==============  ==========================================

Step 1 is always analysed. The plug-in API (what a new analysis implements) is
``callbacks.base.Analysis``.
"""

from callbacks.base import Analysis, should_run
from callbacks.covariance import UpdateCovariance
from callbacks.histograms import UpdateHistograms
from callbacks.symmetry import SymmetryBreaking
from callbacks.tail_index import TailIndex

__all__ = [
    "Analysis",
    "SymmetryBreaking",
    "TailIndex",
    "UpdateCovariance",
    "UpdateHistograms",
    "should_run",
]
