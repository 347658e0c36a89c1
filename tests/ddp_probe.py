"""A callback the DDP test injects with --trainer.callbacks+=: each rank writes what it saw."""

from __future__ import annotations

import os

import lightning as L
import torch


class RankProbe(L.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.first_batch_sum = None
        self.first_params_sum = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first_batch_sum is None:
            self.first_batch_sum = float(batch[0].sum())
            # The optimizees this rank started from (seeded by rank).
            self.first_params_sum = float(sum(p.sum() for p in pl_module._carry["params"]))

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save(
            {
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "global_step": trainer.global_step,
                "lstm": {
                    k: v.detach().cpu() for k, v in pl_module.learned_optimizer.state_dict().items()
                },
                "first_batch_sum": self.first_batch_sum,
                "first_params_sum": self.first_params_sum,
            },
            os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"),
        )
