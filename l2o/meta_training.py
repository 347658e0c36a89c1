"""Meta-training of a learned optimizer as a LightningModule (manual optimization).

One ``training_step`` = one truncation: ``unroll`` optimizee steps driven by the learned
optimizer, then one meta-optimizer step on a meta-gradient estimate. The ``estimator`` decides
how: ``tbptt`` backpropagates the meta-loss through the unroll (truncated backprop, the study);
``pes`` runs antithetic particle pairs with perturbed weights and persistent state and estimates
the gradient of whole inner runs without backprop (:mod:`l2o.estimators`). Either estimate goes
into ``.grad`` of the same meta-optimizer (Adam), with the same clipping.

The optimizees' parameters and the learned optimizer's states are carried (detached) to the next
step; a :class:`~l2o.truncation.TruncationSchedule` says when each member (an optimizee of the
TBPTT population, or a PES pair) restarts with a fresh optimizee: after ``optimizee_steps``
steps (``constant``), or after a run length drawn log-uniformly in
``[min_optimizee_steps, optimizee_steps]``; with ``desync`` each member's first run starts at a
random offset so the population is not in lockstep. Carried tensors, the schedule and PES's
accumulated perturbations are saved in checkpoints: a resumed run continues exactly.

A non-finite meta-loss or meta-gradient skips that meta-update on every rank (counted in
``train/skipped_updates``); an epoch whose every update was skipped stops the run with
:class:`MetaTrainingDiverged`. ``global_step`` counts the meta-updates actually applied.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from l2o.checkpoints import LEGACY_CLASS, build_learned_optimizer, qualified_name
from l2o.data import seeded_generator
from l2o.estimators import PES, set_meta_gradients
from l2o.inner import inner_step
from l2o.lstm import LSTMOptimizer, detach_state
from l2o.optimizees import ConvOptimizee, MLPOptimizee, build_optimizee, spec_of
from l2o.optimizers import Params
from l2o.seeds import VAL_INIT
from l2o.symmetry import constraints_of, penalty
from l2o.trees import tree_map
from l2o.truncation import DISTRIBUTIONS, TruncationSchedule, restart_members, restart_state

# The meta-loss sums the losses seen *before* each update (the study's code): the loss at step t
# depends on the updates 1..t-1 of the truncation, so a truncation needs >= 2 steps for any loss
# to depend on the learned optimizer.
MIN_UNROLL = 2
ESTIMATORS = ("tbptt", "pes")
_PES_NOISE = 7  # salt: PES's perturbations are drawn apart from the optimizees' seeds


class MetaTrainingDiverged(RuntimeError):
    """Every meta-update of an epoch was skipped (non-finite meta-loss or meta-gradient)."""


class MetaTrainingSystem(L.LightningModule):
    """Meta-trains a learned optimizer (by default the study's LSTM) on an optimizee family.

    Args:
        learned_optimizer: the learned optimizer: any ``nn.Module`` with the optimizer protocol
            (``init_state``, ``update``) and ``config()`` (its constructor's kwargs, plain data),
            e.g. ``class_path: l2o.lstm.LSTMOptimizer`` in YAML; default: the study's LSTM. The
            meta-optimizer (Adam on its weights) is ``configure_optimizers``'s.
        optimizee: the optimizee family; default: the study's 784-20-10 Leaky ReLU MLP.
        unroll: optimizee steps per truncation (20 in the study).
        optimizee_steps: steps before the optimizees are replaced by fresh ones (200).
        population: optimizees trained side by side in one vectorized step.
        meta_lr: Adam learning rate of the meta-optimizer.
        meta_loss: ``log`` (log of the summed unroll losses, the study) or ``sum``.
        grad_clip: clip the meta-gradient to this global norm (> 0; None: no clipping).
        symmetry_beta: weight of the symmetry-breaking penalty beta * sum_t sum_j |d_j(-update_t)|.
        symmetry_constraint: ``rescale`` (Leaky ReLU) or ``scale`` (BatchNorm) for the penalty.
        seed: base seed of the optimizees' initialisations (mixed with the DDP rank).
        estimator: ``tbptt`` (truncated backprop through the unroll) or ``pes`` (antithetic
            Persistent Evolution Strategies: ``population`` pairs, 2 x population particles).
        pes_sigma: PES's perturbation scale σ over the learned optimizer's weights.
        pes_pairs: PES's antithetic pairs; each pair trains one optimizee stream of the data,
            so it must equal ``population`` (None: ``population``).
        pes_compile: ``torch.compile`` PES's vmapped update of all particles.
        truncation: ``constant`` inner runs of ``optimizee_steps`` steps, or ``log_uniform``
            lengths in ``[min_optimizee_steps, optimizee_steps]`` (multiples of ``unroll``).
        min_optimizee_steps: the lower bound of ``log_uniform`` run lengths.
        desync: start each member's first run at a random truncation boundary, so members
            restart at different truncations (every truncation mixes early and late steps).
    """

    def __init__(
        self,
        learned_optimizer: nn.Module | None = None,
        optimizee: MLPOptimizee | ConvOptimizee | None = None,
        unroll: int = 20,
        optimizee_steps: int = 200,
        population: int = 1,
        meta_lr: float = 1e-3,
        meta_loss: str = "log",
        grad_clip: float | None = None,
        symmetry_beta: float = 0.0,
        symmetry_constraint: str = "rescale",
        seed: int = 0,
        estimator: str = "tbptt",
        pes_sigma: float = 0.01,
        pes_pairs: int | None = None,
        pes_compile: bool = False,
        truncation: str = "constant",
        min_optimizee_steps: int | None = None,
        desync: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(learned_optimizer, dict):  # from a checkpoint's hyperparameters
            if "class_path" in learned_optimizer:
                learned_optimizer = build_learned_optimizer(
                    learned_optimizer["class_path"], learned_optimizer.get("init_args", {})
                )
            else:  # written before the class was recorded: the LSTM
                learned_optimizer = build_learned_optimizer(LEGACY_CLASS, learned_optimizer)
        self.learned_optimizer = (
            learned_optimizer if learned_optimizer is not None else LSTMOptimizer()
        )
        missing = [
            m
            for m in ("init_state", "update", "config")
            if not callable(getattr(self.learned_optimizer, m, None))
        ]
        if not isinstance(self.learned_optimizer, nn.Module) or missing:
            raise TypeError(
                f"learned_optimizer must be an nn.Module with init_state, update and config; "
                f"{type(self.learned_optimizer).__name__} lacks {missing or 'nn.Module'}"
            )
        self.optimizee = build_optimizee(optimizee if optimizee is not None else MLPOptimizee())
        if optimizee_steps < 1 or population < 1:
            raise ValueError("optimizee_steps and population must be >= 1")
        if unroll < MIN_UNROLL:
            raise ValueError(
                f"unroll={unroll}: the meta-loss sums the optimizee losses seen before each update "
                "(as the study's code does), so with fewer than 2 steps per truncation no loss "
                "depends on the learned optimizer and nothing is meta-trained. Use unroll >= 2 "
                "(20 in the study)."
            )
        if unroll > optimizee_steps:
            raise ValueError(f"unroll={unroll} exceeds optimizee_steps={optimizee_steps}")
        if optimizee_steps % unroll:
            raise ValueError(
                f"optimizee_steps={optimizee_steps} is not a multiple of unroll={unroll}"
            )
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if pes_pairs is not None and pes_pairs != population:
            raise ValueError(
                f"pes_pairs={pes_pairs} but population={population}: each PES pair trains one "
                f"optimizee stream of the data, so set --model.population {pes_pairs} (pes_pairs "
                "defaults to it)"
            )
        if truncation not in DISTRIBUTIONS:
            raise ValueError(f"truncation must be one of {DISTRIBUTIONS}, got {truncation!r}")
        if truncation == "log_uniform" and min_optimizee_steps is None:
            raise ValueError(
                "truncation log_uniform needs min_optimizee_steps (the shortest run; "
                "optimizee_steps is the longest)"
            )
        if meta_loss not in ("log", "sum"):
            raise ValueError(f"meta_loss must be 'log' or 'sum', got {meta_loss!r}")
        if meta_lr <= 0:
            raise ValueError(f"meta_lr must be > 0, got {meta_lr}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(
                f"grad_clip must be > 0 (the largest meta-gradient norm kept), or null for no "
                f"clipping; got {grad_clip} (a negative bound would flip the meta-gradient)"
            )
        if symmetry_beta < 0:
            raise ValueError(f"symmetry_beta must be >= 0, got {symmetry_beta}")
        if symmetry_beta > 0:
            self._check_constraint(symmetry_constraint)
        self.save_hyperparameters(ignore=["learned_optimizer", "optimizee"])
        self._new_schedule(0)  # checked here: a bad schedule fails before any work
        self._check_partial_restarts()
        # Plain data only, so checkpoints load with weights_only=True.
        self.hparams["learned_optimizer"] = {
            "class_path": self.learned_optimizer_class,
            "init_args": dict(self.learned_optimizer.config()),
        }
        self.hparams["optimizee"] = spec_of(self.optimizee)
        self.automatic_optimization = False
        self._carry: dict[str, Any] | None = None  # optimizee params, LSTM state, counters
        self._schedule: TruncationSchedule | None = None  # built at the first step (rank known)
        self._saved_schedule: dict[str, Tensor] | None = None  # from a checkpoint
        self._pes: PES | None = (
            PES(
                self.learned_optimizer,
                self.optimizee,
                pairs=population,
                sigma=pes_sigma,
                meta_loss=meta_loss,
                torch_compile=pes_compile,
            )
            if estimator == "pes"
            else None
        )
        self._runs_started = 0
        self._val: dict[str, Any] = {}
        # Skipped meta-updates: in all, and in this epoch out of its training steps.
        self._skipped = 0
        self._epoch_skipped = self._epoch_steps = 0
        self._resumed: dict[str, Any] | None = None  # the checkpoint's "l2o" entry, on resume

    @property
    def learned_optimizer_class(self) -> str:
        return qualified_name(type(self.learned_optimizer))

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

    def _new_schedule(self, rank: int) -> TruncationSchedule:
        hp = self.hparams
        constant = hp.truncation == "constant"
        return TruncationSchedule(
            members=hp.population,  # TBPTT's optimizees, or PES's pairs
            unroll=hp.unroll,
            min_steps=hp.optimizee_steps if constant else hp.min_optimizee_steps,
            max_steps=None if constant else hp.optimizee_steps,
            distribution=hp.truncation,
            desync=hp.desync,
            seed=hp.seed * 1_000_003 + rank,  # per rank: ranks restart independently
        )

    def _check_partial_restarts(self) -> None:
        """Fail now, not at the first desynchronised restart, when the learned optimizer's state
        has an entry shared by the whole population (e.g. MLPLOpt's step count): one member
        cannot restart while the others carry on."""
        hp = self.hparams
        if hp.population == 1 or (hp.truncation == "constant" and not hp.desync):
            return  # every member restarts at once
        if callable(getattr(self.learned_optimizer, "restart_members", None)):
            return
        state = self.learned_optimizer.init_state(self.optimizee.init(2, seeded_generator(0)))
        shared = [
            k for k, v in state.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if shared:
            raise ValueError(
                f"{type(self.learned_optimizer).__name__} keeps {shared} shared by the whole "
                f"population, so one member cannot restart while the others carry on: with "
                f"population {hp.population}, use --model.truncation constant and "
                "--model.desync false (or population 1)"
            )

    def _fresh_carry(self, params: Params) -> dict[str, Any]:
        if self._pes is not None:
            return self._pes.init_carry(params)
        return {"params": params, "state": self.learned_optimizer.init_state(params)}

    def _restart(self, carry: dict[str, Any], mask: Tensor, params: Params) -> dict[str, Any]:
        """The members in ``mask`` restart with the rows of ``params``; the others carry on."""
        try:
            if self._pes is not None:
                return self._pes.reset(carry, mask, params)
            fresh = self.learned_optimizer.init_state(params)
            return {
                "params": restart_members(mask, params, carry["params"]),
                "state": restart_state(self.learned_optimizer, carry["state"], fresh, mask),
            }
        except ValueError as err:
            raise ValueError(
                f"{type(self.learned_optimizer).__name__} cannot restart one member of the "
                f"population while the others carry on ({err}); use truncation constant without "
                "desync, or population 1"
            ) from err

    def _advance(self) -> None:
        """Start a truncation: restart the members whose run is over, per the schedule."""
        if self._schedule is None:
            self._schedule = self._new_schedule(self.global_rank)
            if self._saved_schedule is not None:
                self._schedule.load_state_dict(self._saved_schedule)
                self._saved_schedule = None
        if self._carry is None:  # a fresh start: everyone starts a run
            self._schedule.force_restart()
        trunc = self._schedule.next_truncation()
        if not bool(trunc.restart.any()):
            return
        params = self.fresh_optimizees(
            self.hparams.population, (self.hparams.seed, self.global_rank, self._runs_started)
        )
        self._runs_started += 1
        draws = self._carry.get("draws", 0) if self._carry is not None else 0
        if self._carry is None or bool(trunc.restart.all()):
            carry = self._fresh_carry(params)
        else:
            carry = self._restart(self._carry, trunc.restart, params)
        self._carry = {**carry, "draws": draws}

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
        self._advance()
        carry = self._carry
        if self._pes is not None:
            objective, logs, new_carry = self._pes_truncation(carry, x, y)
        else:
            objective, logs, new_carry = self._tbptt_truncation(carry, x, y)
        meta_opt = self.optimizers()
        self._epoch_steps += 1
        # All ranks must agree to skip, or DDP's gradient all-reduce would hang.
        finite = torch.isfinite(objective.detach()).float()
        finite = self.trainer.strategy.reduce(finite, reduce_op="min") if self._ddp() else finite
        if finite.item() < 1:
            self._skip(batch_idx, "non-finite meta-loss: update skipped, optimizees restarted")
            self._schedule.force_restart()
            return objective.detach()
        meta_opt.zero_grad()
        if self._pes is not None:
            # Each rank's particles give an estimate; their mean keeps the ranks identical.
            reduce = (
                (lambda t: self.trainer.strategy.reduce(t, reduce_op="mean"))
                if self._ddp()
                else None
            )
            set_meta_gradients(self.learned_optimizer.parameters(), new_carry.pop("grads"), reduce)
        else:
            self.manual_backward(objective)
        norm = torch.nn.utils.clip_grad_norm_(
            self.learned_optimizer.parameters(), self.hparams.grad_clip or math.inf
        )
        if torch.isfinite(norm):  # the same on all ranks: gradients are all-reduced
            meta_opt.step()
        else:
            self._skip(batch_idx, "non-finite meta-gradient: update skipped")
        self._carry = {**new_carry, "draws": carry["draws"] + 1}
        losses = logs.pop("losses")
        self.log_dict(
            {
                "train/meta_loss": logs.pop("meta_loss"),
                "train/optimizee_loss": losses.mean(),
                "train/optimizee_final_loss": losses[-1].mean(),
                "train/meta_grad_norm": norm,
            },
            prog_bar=False,
        )
        self.log("loss", losses[-1].mean(), prog_bar=True, logger=False)
        if self.hparams.symmetry_beta > 0:
            self.log("train/symmetry_penalty", logs.pop("penalty"))
        return objective.detach()

    def _tbptt_truncation(self, carry: dict, x: Tensor, y: Tensor) -> tuple[Tensor, dict, dict]:
        """The truncation on the autograd graph: the objective to backpropagate."""
        beta = self.hparams.symmetry_beta
        with torch.enable_grad():
            losses, pen, params, state = self.unroll(carry["params"], carry["state"], x, y, beta)
            meta_loss = self.meta_loss(losses)
            objective = meta_loss + beta * pen.mean()
        new_carry = {"params": tuple(p.detach() for p in params), "state": detach_state(state)}
        logs = {"losses": losses.detach(), "meta_loss": meta_loss.detach()}
        return objective, {**logs, "penalty": pen.detach().mean()}, new_carry

    def _pes_truncation(self, carry: dict, x: Tensor, y: Tensor) -> tuple[Tensor, dict, dict]:
        """The truncation for every particle (no graph) and PES's estimate (in ``grads``)."""
        hp = self.hparams
        # The perturbations: a pure function of (seed, rank, truncation count), so a resumed run
        # draws the same ones; ranks draw their own.
        gen = seeded_generator(hp.seed, self.global_rank, _PES_NOISE, carry["draws"])
        penalty_fn = None
        if hp.symmetry_beta > 0:

            def penalty_fn(params: Params, updates: Params) -> Tensor:
                delta = tuple(-u for u in updates)
                return hp.symmetry_beta * penalty(
                    self.optimizee, params, delta, hp.symmetry_constraint
                )

        pes_carry = {k: carry[k] for k in ("params", "state", "xi")}
        est = self._pes.estimate(pes_carry, x, y, gen, penalty=penalty_fn)
        objective = est.meta_loss + est.penalty
        pen = est.penalty / hp.symmetry_beta if hp.symmetry_beta > 0 else est.penalty
        logs = {"losses": est.losses, "meta_loss": est.meta_loss, "penalty": pen}
        return objective, logs, {**est.carry, "grads": est.grads}

    def _skip(self, batch_idx: int, what: str) -> None:
        self._skipped += 1
        self._epoch_skipped += 1
        self.log("train/skipped_updates", float(self._skipped))
        warnings.warn(
            f"epoch {self.current_epoch}, batch {batch_idx}: {what} ({self._skipped} skipped "
            "so far; see train/skipped_updates)",
            RuntimeWarning,
            stacklevel=3,
        )

    def on_train_epoch_start(self) -> None:
        # Not called when Lightning resumes mid-epoch: the restored counts carry on.
        self._epoch_skipped = self._epoch_steps = 0

    def on_train_epoch_end(self) -> None:
        self.log("train/skipped_updates", float(self._skipped))
        if self._epoch_steps and self._epoch_skipped == self._epoch_steps:
            raise MetaTrainingDiverged(
                f"every one of the {self._epoch_steps} meta-updates of epoch "
                f"{self.current_epoch} was skipped (non-finite meta-loss or meta-gradient): "
                "meta-training has diverged. Lower --model.meta_lr, clip with "
                "--model.grad_clip 1.0, or resume from an earlier checkpoint."
            )

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
        # Every rank carries its own optimizees; rank 0 writes the file, so gather them (every
        # rank runs this hook for every save: Trainer.save_checkpoint is collective).
        carry = self._carry
        if carry is not None:  # the schedule travels with the carry it drives
            carry = _to_cpu({**carry, "schedule": self._schedule.state_dict()})
        carries = [carry]
        if self._ddp() and torch.distributed.is_initialized():
            carries = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(carries, carry)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer else None
        checkpoint.setdefault("l2o", {}).update(
            {
                "format": 2,
                "learned_optimizer_class": self.learned_optimizer_class,
                "learned_optimizer_config": dict(self.learned_optimizer.config()),
                "optimizee": spec_of(self.optimizee),
                "world_size": self.trainer.world_size if self._trainer else 1,
                "data": dm.fingerprint if getattr(dm, "train_y", None) is not None else None,
                "runs_started": self._runs_started,
                "carries": carries,  # indexed by rank
                "skipped_updates": self._skipped,
                "epoch_counts": [self._epoch_steps, self._epoch_skipped],
            }
        )

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("l2o", {})
        self._resumed = saved
        self._runs_started = saved.get("runs_started", 0)
        self._skipped = saved.get("skipped_updates", 0)
        self._epoch_steps, self._epoch_skipped = saved.get("epoch_counts", (0, 0))
        if "carries" in saved:
            carries = saved["carries"]
            rank = self.global_rank if self._trainer else 0
            if len(carries) != (self.trainer.world_size if self._trainer else 1):
                raise ValueError(
                    f"the checkpoint was written by {len(carries)} DDP processes, this run has "
                    f"{self.trainer.world_size}: resume with --trainer.devices/num_nodes as before"
                )
            carry = carries[rank]
        else:  # written by an older version: one carry
            carry = saved.get("carry")
            if carry is not None and "shapes" in carry["state"]:
                carry["state"]["shapes"] = tuple(tuple(s) for s in carry["state"]["shapes"])
        self._schedule, self._saved_schedule = None, None
        if carry is not None:
            carry = dict(carry)
            carry["params"] = tuple(carry["params"])
            if "xi" in carry:
                carry["xi"] = tuple(carry["xi"])
            if "schedule" in carry:
                self._saved_schedule = carry.pop("schedule")
            else:  # written before truncation schedules: every member at the same step
                members = carry["params"][0].shape[0]
                self._saved_schedule = {
                    "steps": torch.full((members,), int(carry.pop("step")), dtype=torch.long),
                    "lengths": torch.full((members,), self.hparams.optimizee_steps),
                    "runs": torch.ones(members, dtype=torch.long),
                }
            carry.setdefault("draws", 0)
            if (self._pes is None) == ("xi" in carry):
                raise ValueError(
                    "the checkpoint's carried state is of another estimator than "
                    f"--model.estimator {self.hparams.estimator}: resume with the same estimator"
                )
        self._carry = carry

    def on_train_start(self) -> None:
        if self._carry is not None:  # resumed: move the carried optimizees to our device
            self._carry = tree_map(
                lambda t: t.to(self.device) if isinstance(t, Tensor) else t, self._carry
            )
        # Lightning restores the meta-optimizer's learning rate from a checkpoint; the command's
        # --model.meta_lr wins (train.py prints the change).
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self.hparams.meta_lr
        if self._resumed is not None:
            dm = getattr(self.trainer, "datamodule", None)
            saved, now = self._resumed.get("data"), getattr(dm, "fingerprint", None)
            if saved is not None and now is not None and saved != now:
                raise ValueError(
                    f"the checkpoint was meta-trained on other data ({saved}) than this run's "
                    f"({now}): resume with the same --data.root"
                )


def _to_cpu(tree: Any) -> Any:
    return tree_map(lambda t: t.detach().cpu() if isinstance(t, Tensor) else t, tree)
