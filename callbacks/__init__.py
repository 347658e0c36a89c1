"""Lightning callbacks that analyse a meta-test run step by step, one analysis per file.

Attach any of them, alone or together, to ``Trainer(inference_mode=False, ...).test(
MetaTestSystem(...), datamodule=MetaTestData(...))``; ``evaluate.py`` takes them as config
objects (``--analyses``, default list: ``configs/analyses.yaml``). Each logs under its ``name``:

=====================  ================  ==============  =========================================
callback               name (prefix)     every_n_steps   what
=====================  ================  ==============  =========================================
``SymmetryBreaking``   ``symmetry``      1               symmetry deviations of update, gradient
``TailIndex``          ``tail_index``    10              alpha of minibatch gradient/update noise
``UpdateCovariance``   ``covariance``    50              top eigenvalue, trace of update/grad cov.
``UpdateHistograms``   ``update_hist``   50              distribution of log10 |update|
``UpdateRatio``        ``update_ratio``  10              ||update|| / ||weights|| per tensor
``Curvature``          ``curvature``     50              Hessian lambda_max (vs 2/lr), trace
``StepLength``         ``step_length``   10              Cockpit's normalised step length
``GradientNoise``      ``gsnr``          10              mean GSNR, norm/inner/orthogonality tests
=====================  ================  ==============  =========================================

Step 1 is always analysed. Each takes ``schedule="linear"`` (every ``every_n_steps``) or
``"log"`` (as many steps, log-spaced up to the last: ``callbacks.base.schedule_steps``).
Presets (``evaluate.py --preset none|economy|full``): ``callbacks.presets``. The plug-in API
(what a new analysis implements) is ``callbacks.base.Analysis``.
"""

from callbacks.base import Analysis, schedule_steps, should_run
from callbacks.covariance import UpdateCovariance
from callbacks.curvature import Curvature
from callbacks.gsnr import GradientNoise
from callbacks.histograms import UpdateHistograms
from callbacks.step_length import StepLength
from callbacks.symmetry import SymmetryBreaking
from callbacks.tail_index import TailIndex
from callbacks.update_ratio import UpdateRatio

__all__ = [
    "Analysis",
    "Curvature",
    "GradientNoise",
    "StepLength",
    "SymmetryBreaking",
    "TailIndex",
    "UpdateCovariance",
    "UpdateHistograms",
    "UpdateRatio",
    "schedule_steps",
    "should_run",
]
