"""Meta-training of the LSTM optimizer as a LightningModule (manual optimization, TBPTT).

One ``training_step`` = one truncation: ``unroll`` optimizee steps driven by the LSTM, then one
meta-optimizer step on the gradient of the meta-loss through the unroll. The optimizees' parameters
and the LSTM's hidden states are carried (detached) to the next step and replaced by freshly
initialised optimizees every ``optimizee_steps`` steps. They are plain tensors, not parameters,
and they are saved in checkpoints so that a resumed run continues the same optimizees.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import torch
from torch import Tensor

from l2o.data import seeded_generator
from l2o.inner import inner_step
from l2o.lstm import LSTMOptimizer, detach_state
from l2o.optimizees import MLPOptimizee, build_optimizee, spec_of
from l2o.optimizers import Params
from l2o.seeds import VAL_INIT
from l2o.symmetry import constraints_of, penalty


class MetaTrainingSystem(L.LightningModule):
    """Meta-trains an :class:`~l2o.lstm.LSTMOptimizer` on an optimizee family.

    Args:
        learned_optimizer: the learned optimizer (a plain ``nn.Module``); default: the study's
            LSTM. The meta-optimizer (Adam on its weights) is ``configure_optimizers``'s.
        optimizee: the optimizee family; default: the study's 784-20-10 Leaky ReLU MLP.
        unroll: optimizee steps per truncation (20 in the study).
        optimizee_steps: steps before the optimizees are replaced by fresh ones (200).
        population: optimizees trained side by side in one vectorized step.
        meta_lr: Adam learning rate of the meta-optimizer.
        meta_loss: ``log`` (log of the summed unroll losses, the study) or ``sum``.
        grad_clip: clip the meta-gradient to this global norm (None: no clipping).
        symmetry_beta: weight of the symmetry-breaking penalty beta * sum_t sum_j |d_j(-update_t)|.
        symmetry_constraint: ``rescale`` (Leaky ReLU) or ``scale`` (BatchNorm) for the penalty.
        seed: base seed of the optimizees' initialisations (mixed with the DDP rank).
    """

    def __init__(
        self,
        learned_optimizer: LSTMOptimizer | None = None,
        optimizee: MLPOptimizee | None = None,
        unroll: int = 20,
        optimizee_steps: int = 200,
        population: int = 1,
        meta_lr: float = 1e-3,
        meta_loss: str = "log",
        grad_clip: float | None = None,
        symmetry_beta: float = 0.0,
        symmetry_constraint: str = "rescale",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(learned_optimizer, dict):  # from a checkpoint's hyperparameters
            learned_optimizer = LSTMOptimizer(**learned_optimizer)
        self.learned_optimizer = (
            learned_optimizer if learned_optimizer is not None else LSTMOptimizer()
        )
        self.optimizee = build_optimizee(optimizee if optimizee is not None else MLPOptimizee())
        if unroll < 1 or optimizee_steps < 1 or population < 1:
            raise ValueError("unroll, optimizee_steps and population must be >= 1")
        if unroll > optimizee_steps:
            raise ValueError(f"unroll={unroll} exceeds optimizee_steps={optimizee_steps}")
        if optimizee_steps % unroll:
            raise ValueError(
                f"optimizee_steps={optimizee_steps} is not a multiple of unroll={unroll}"
            )
        if meta_loss not in ("log", "sum"):
            raise ValueError(f"meta_loss must be 'log' or 'sum', got {meta_loss!r}")
        if meta_lr <= 0:
            raise ValueError(f"meta_lr must be > 0, got {meta_lr}")
        if symmetry_beta < 0:
            raise ValueError(f"symmetry_beta must be >= 0, got {symmetry_beta}")
        if symmetry_beta > 0:
            self._check_constraint(symmetry_constraint)
        self.save_hyperparameters(ignore=["learned_optimizer", "optimizee"])
        # Plain data only, so checkpoints load with weights_only=True.
        self.hparams["learned_optimizer"] = self.learned_optimizer.config()
        self.hparams["optimizee"] = spec_of(self.optimizee)
        self.automatic_optimization = False
        self._carry: dict[str, Any] | None = None  # optimizee params, LSTM state, counters
        self._runs_started = 0
        self._val: dict[str, Any] = {}

    def _check_constraint(self, constraint: str) -> None:
        if constraint not in ("rescale", "scale"):
            raise ValueError(
                f"symmetry_constraint must be 'rescale' or 'scale', got {constraint!r}"
            )
        if constraint not in constraints_of(self.optimizee):  # the analyses' own rule
            needs = "a Leaky ReLU/ReLU" if constraint == "rescale" else "a BatchNorm"
            raise ValueError(
                f"the {constraint} penalty needs {needs} optimizee, got {self.optimizee.name}"
            )

    def setup(self, stage: str) -> None:
        # Fail before any step when the data does not fit the optimizee family.
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if dm is not None and getattr(dm, "train_x", None) is not None:
            self.optimizee.check_input(dm.num_features)

    # ------------------------------------------------------------------ optimizees
    def fresh_optimizees(self, population: int, seed_keys: tuple[int, ...]) -> Params:
        gen = seeded_generator(*seed_keys)
        return self.optimizee.init(population, gen, device=self.device)

    def _reset(self) -> None:
        params = self.fresh_optimizees(
            self.hparams.population, (self.hparams.seed, self.global_rank, self._runs_started)
        )
        self._runs_started += 1
        state = self.learned_optimizer.init_state(params)
        self._carry = {"params": params, "state": state, "step": 0}

    # ------------------------------------------------------------------ the unroll
    def unroll(
        self,
        params: Params,
        state: dict,
        x: Tensor,
        y: Tensor,
        beta: float = 0.0,
        meta: bool = True,
    ) -> tuple[Tensor, Tensor, Params, dict]:
        """Run ``len(x)`` optimizee steps. Returns (losses (T, P), penalty (P,), params, state).

        Gradients fed to the LSTM are detached (as in the study). With ``meta=True`` the losses
        and updated parameters stay on the graph of the LSTM's weights for the meta-gradient;
        with ``meta=False`` (meta-validation) no such graph is built.
        """
        losses, pen = [], x.new_zeros(params[0].shape[0])
        for t in range(x.shape[0]):
            step = inner_step(
                self.optimizee, self.learned_optimizer, params, state, x[t], y[t], meta=meta
            )
            if beta > 0:
                with torch.set_grad_enabled(meta):
                    delta = tuple(-u for u in step.updates)
                    pen = pen + penalty(
                        self.optimizee, params, delta, self.hparams.symmetry_constraint
                    )
            params, state = step.params, step.state
            losses.append(step.loss)
        return torch.stack(losses), pen, params, state

    def meta_loss(self, losses: Tensor) -> Tensor:
        total = losses.sum(0)  # per optimizee
        return (total.log() if self.hparams.meta_loss == "log" else total).mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (T, P, B, D), (T, P, B)
        if x.shape[1] != self.hparams.population:
            raise ValueError(
                f"batch has population {x.shape[1]}, the model "
                f"{self.hparams.population}: link data.population to the model"
            )
        self.optimizee.check_input(x.shape[-1])
        if self._carry is None or self._carry["step"] >= self.hparams.optimizee_steps:
            self._reset()
        carry = self._carry
        beta = self.hparams.symmetry_beta
        with torch.enable_grad():
            losses, pen, params, state = self.unroll(carry["params"], carry["state"], x, y, beta)
            meta_loss = self.meta_loss(losses)
            objective = meta_loss + beta * pen.mean()
        meta_opt = self.optimizers()
        # All ranks must agree to skip, or DDP's gradient all-reduce would hang.
        finite = torch.isfinite(objective.detach()).float()
        finite = self.trainer.strategy.reduce(finite, reduce_op="min") if self._ddp() else finite
        if finite.item() < 1:
            warnings.warn(
                f"non-finite meta-loss at step {self.global_step}: update skipped and "
                "the optimizees restarted",
                RuntimeWarning,
                stacklevel=2,
            )
            self._carry = None
            return objective.detach()
        meta_opt.zero_grad()
        self.manual_backward(objective)
        norm = torch.nn.utils.clip_grad_norm_(
            self.learned_optimizer.parameters(), self.hparams.grad_clip or math.inf
        )
        if torch.isfinite(norm):  # the same on all ranks: gradients are all-reduced
            meta_opt.step()
        else:
            warnings.warn(
                f"non-finite meta-gradient at step {self.global_step}: update skipped",
                RuntimeWarning,
                stacklevel=2,
            )
        self._carry = {
            "params": tuple(p.detach() for p in params),
            "state": detach_state(state),
            "step": carry["step"] + x.shape[0],
        }
        self.log_dict(
            {
                "train/meta_loss": meta_loss.detach(),
                "train/optimizee_loss": losses.detach().mean(),
                "train/optimizee_final_loss": losses.detach()[-1].mean(),
                "train/meta_grad_norm": norm,
            },
            prog_bar=False,
        )
        self.log("loss", losses.detach()[-1].mean(), prog_bar=True, logger=False)
        if beta > 0:
            self.log("train/symmetry_penalty", pen.detach().mean())
        return objective.detach()

    def _ddp(self) -> bool:
        return self.trainer is not None and self.trainer.world_size > 1

    # ------------------------------------------------------------------ meta-validation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch  # (T, R, B, D): R seeded runs, the same every epoch
        if batch_idx == 0:
            params = self.fresh_optimizees(x.shape[1], (VAL_INIT, self.hparams.seed))
            state = self.learned_optimizer.init_state(params)
            self._val = {"params": params, "state": state, "losses": []}
        with torch.enable_grad():
            losses, _, params, state = self.unroll(
                self._val["params"], self._val["state"], x, y, meta=False
            )
        self._val.update(params=tuple(p.detach() for p in params), state=detach_state(state))
        self._val["losses"].append(losses.detach())

    def on_validation_epoch_end(self) -> None:
        if not self._val.get("losses"):
            return
        losses = torch.cat(self._val["losses"])  # (steps, R)
        self.log("val/final_loss", losses[-1].mean(), sync_dist=True)
        self.log("val/summed_loss", losses.sum(0).mean(), sync_dist=True, prog_bar=True)
        self._val = {}

    # ------------------------------------------------------------------ plumbing
    def configure_optimizers(self):
        return torch.optim.Adam(self.learned_optimizer.parameters(), lr=self.hparams.meta_lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["l2o"] = {
            "optimizer_config": self.learned_optimizer.config(),
            "optimizee": spec_of(self.optimizee),
            "runs_started": self._runs_started,
            "carry": _to_cpu(self._carry),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("l2o", {})
        self._runs_started = saved.get("runs_started", 0)
        carry = saved.get("carry")
        if carry is not None:
            carry["params"] = tuple(carry["params"])
            carry["state"]["shapes"] = tuple(tuple(s) for s in carry["state"]["shapes"])
        self._carry = carry

    def on_train_start(self) -> None:
        if self._carry is not None:  # resumed: move the carried optimizees to our device
            self._carry = torch.utils._pytree.tree_map(
                lambda t: t.to(self.device) if isinstance(t, Tensor) else t, self._carry
            )


def _to_cpu(tree: Any) -> Any:
    return torch.utils._pytree.tree_map(
        lambda t: t.detach().cpu() if isinstance(t, Tensor) else t, tree
    )
