"""Meta-test analysis callbacks: tags reach TensorBoard, values match ground truths, and the
analyses never change the run they observe."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from callbacks import (
    ALL_TAG_PREFIXES,
    SymmetryBreaking,
    TailIndex,
    UpdateCovariance,
    UpdateHistograms,
    custom_scalars_layout,
    emitted_tags,
    tags_by_category,
)
from callbacks.tail_index import minibatch_grads
from l2o.lstm import LSTMOptimizer
from l2o.meta_testing import MetaTestSystem, MinibatchStream
from l2o.optimizees import MLPOptimizee, grads_of
from l2o.optimizers import SGD, Adam
from l2o.tail_index import noise_alphas

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*IterableDataset.*has `__len__`.*"),
]

D_IN, HIDDEN, CLASSES, BATCH = 20, 8, 4, 16
STEPS = 4
LR = 0.125  # a power of two: lr * x is exact in floating point, so scalings compare exactly
LEAKY = MLPOptimizee((D_IN, HIDDEN, CLASSES))
BN = MLPOptimizee((D_IN, HIDDEN, CLASSES), activation="relu", batchnorm=True)


class TinyData(L.LightningDataModule):
    """Random features: a training split for the analyses and one stream of minibatches."""

    def __init__(self, n_train: int = 160, steps: int = STEPS, seed: int = 0, blank: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.train_x = torch.randn(n_train, D_IN, generator=g)
        self.train_x[:, :blank] = 0  # always-zero features, like MNIST's border pixels
        self.train_y = torch.randint(0, CLASSES, (n_train,), generator=g)
        self.test_x = torch.randn(64, D_IN, generator=g)
        self.test_y = torch.randint(0, CLASSES, (64,), generator=g)
        self.steps, self.seed = steps, seed

    def test_dataloader(self) -> DataLoader:
        stream = MinibatchStream(self.train_x, self.train_y, self.steps, BATCH, self.seed)
        return DataLoader(stream, batch_size=None)


def run(tmp_path, optimizer, callbacks=(), optimizee=LEAKY, steps=STEPS, logger=True, blank=0):
    module = MetaTestSystem(optimizer, optimizee, seed=0, eval_every=2, steps=steps)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        inference_mode=False,
        logger=TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
        if logger
        else False,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.test(module, datamodule=TinyData(steps=steps, blank=blank), verbose=False)
    return module, trainer


def events(trainer) -> EventAccumulator:
    trainer.logger.experiment.flush()
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def logged(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def make_optimizer(name: str):
    if name == "sgd":
        return SGD(lr=LR, momentum=0.0)
    torch.manual_seed(0)
    return LSTMOptimizer(hidden_size=8)


ALL = {
    "symmetry": lambda: SymmetryBreaking(every_n_steps=2),
    "tail_index": lambda: TailIndex(every_n_steps=2),
    "covariance": lambda: UpdateCovariance(every_n_steps=2, num_samples=48),
    "update_hist": lambda: UpdateHistograms(every_n_steps=2, max_samples=50),
}


# --------------------------------------------------------------------------- tags
@pytest.mark.parametrize("opt_name", ["sgd", "lstm"])
@pytest.mark.parametrize("which", list(ALL))
def test_each_callback_alone_logs_its_tags(tmp_path, opt_name, which):
    cb = ALL[which]()
    module, trainer = run(tmp_path, make_optimizer(opt_name), [cb])
    acc = events(trainer)
    scalars = set(acc.Tags()["scalars"])
    expected = set(emitted_tags(LEAKY, [cb])[f"{which}/"])
    ours = {t for t in scalars if t.startswith(ALL_TAG_PREFIXES)}
    assert ours == expected  # every promised tag, nothing else under the callbacks' prefixes
    for tag in expected:
        values = logged(acc, tag)
        assert sorted(values) == [1, 2, 4]  # step 1 always, then every 2nd step
        assert sorted(s for s, _ in module.history[tag]) == [1, 2, 4]
        assert all(math.isfinite(v) for v in values.values()), tag
    if which == "update_hist":
        assert acc.Tags()["histograms"] == ["update_hist/abs_update"]
        assert [e.step for e in acc.Histograms("update_hist/abs_update")] == [1, 2, 4]
        assert sorted(cb.samples) == [1, 2, 4]
        assert all(len(v) == 50 and (v >= 0).all() for v in cb.samples.values())
    else:
        assert acc.Tags()["histograms"] == []


def test_all_callbacks_together_with_batchnorm(tmp_path):
    cbs = [f() for f in ALL.values()]
    module, trainer = run(tmp_path, Adam(lr=1e-2), cbs, optimizee=BN)
    scalars = set(events(trainer).Tags()["scalars"])
    for prefix, tags in emitted_tags(BN, cbs).items():
        assert tags and set(tags) <= scalars, prefix
    assert {"symmetry/update/scale/normalized", "symmetry/grad/rescale/abs_sum"} <= scalars
    # the scale symmetry holds for gradients up to BN's epsilon; Adam breaks it
    g = dict(module.history["symmetry/grad/scale/normalized"])
    u = dict(module.history["symmetry/update/scale/normalized"])
    assert max(g.values()) < 1e-2 and min(u.values()) > 10 * max(g.values())


def test_tag_listings():
    cats = tags_by_category()
    assert set(cats) == {p.rstrip("/") for p in ALL_TAG_PREFIXES}
    assert "symmetry/update/scale/abs_sum" in cats["symmetry"]  # every constraint, no optimizee
    assert "symmetry/update/scale/abs_sum" not in emitted_tags(LEAKY)["symmetry/"]
    assert set(emitted_tags(LEAKY)["tail_index/"]) == {
        f"tail_index/{k}/{s}"
        for k in ("grad", "update")
        for s in ("pooled", "robust", "zero_fraction")
    }
    layout = custom_scalars_layout(LEAKY)
    assert layout["covariance"]["top_eig"] == [
        "Multiline",
        ["covariance/update/top_eig", "covariance/grad/top_eig"],
    ]
    charted = {t for cat in layout.values() for _, (_, tags) in cat.items() for t in tags}
    assert charted == {t for tags in emitted_tags(LEAKY).values() for t in tags}


# --------------------------------------------------------------------------- ground truths
def test_symmetry_sgd_update_is_lr_times_grad(tmp_path):
    _, trainer = run(tmp_path, SGD(lr=LR, momentum=0.0), [SymmetryBreaking()])
    acc = events(trainer)
    for c in ("rescale", "translation"):
        for stat in ("abs_sum", "signed_sum", "normalized"):
            grad = logged(acc, f"symmetry/grad/{c}/{stat}")
            upd = logged(acc, f"symmetry/update/{c}/{stat}")
            assert sorted(grad) == list(range(1, STEPS + 1))
            scale = 1.0 if stat == "normalized" else LR
            for step, value in grad.items():
                assert upd[step] == pytest.approx(scale * value, rel=1e-6, abs=1e-30)
        # gradients obey the constraints: ~0 (float rounding only)
        assert max(logged(acc, f"symmetry/grad/{c}/normalized").values()) < 1e-4


def test_symmetry_adam_breaks_what_gradients_keep(tmp_path):
    module, _ = run(tmp_path, Adam(lr=1e-2), [SymmetryBreaking()])
    for c in ("rescale", "translation"):
        g = dict(module.history[f"symmetry/grad/{c}/normalized"])
        u = dict(module.history[f"symmetry/update/{c}/normalized"])
        assert all(u[s] > 1e-3 > 10 * g[s] for s in g), c


def test_tail_index_sgd_update_alpha_equals_grad_alpha(tmp_path):
    _, trainer = run(tmp_path, SGD(lr=LR, momentum=0.0), [TailIndex(every_n_steps=1)])
    acc = events(trainer)
    for stat in ("pooled", "robust", "zero_fraction"):
        grad, upd = logged(acc, f"tail_index/grad/{stat}"), logged(acc, f"tail_index/update/{stat}")
        assert sorted(grad) == list(range(1, STEPS + 1))
        for step, value in grad.items():
            assert upd[step] == pytest.approx(value, rel=1e-5), (stat, step)
    assert all(0 < a < 4 for a in logged(acc, "tail_index/grad/robust").values())


class ConstantStep:
    """A protocol optimizer that ignores its gradient: its update noise is exactly zero."""

    name = "constant"

    def init_state(self, params):
        return {"step": 0}

    def update(self, grads, state, params=None):
        return tuple(torch.full_like(g, -1e-3) for g in grads), {"step": state["step"] + 1}


def test_tail_index_blank_features_give_exact_zero_noise(tmp_path):
    # the first-layer weights of an always-zero feature get the same (zero) gradient from every
    # minibatch, so their update noise must be exactly zero for every optimizer, LSTM included
    module, _ = run(tmp_path, make_optimizer("lstm"), [TailIndex(every_n_steps=1)], blank=5)
    grad = dict(module.history["tail_index/grad/zero_fraction"])
    upd = dict(module.history["tail_index/update/zero_fraction"])
    assert all(grad[s] >= 5 * HIDDEN / LEAKY.num_params - 1e-12 for s in grad)
    assert all(upd[s] >= grad[s] for s in grad)


def test_tail_index_without_update_noise_logs_nan(tmp_path):
    with pytest.warns(UserWarning, match="no update tail index"):
        module, _ = run(tmp_path, ConstantStep(), [TailIndex()], steps=1)
    hist = {k: v[0][1] for k, v in module.history.items() if k.startswith("tail_index/")}
    assert math.isnan(hist["tail_index/update/pooled"]) and math.isnan(
        hist["tail_index/update/robust"]
    )
    assert hist["tail_index/update/zero_fraction"] == 1.0
    assert math.isfinite(hist["tail_index/grad/robust"])


def test_minibatch_grads_match_a_loop():
    for optimizee in (LEAKY, BN):
        params = optimizee.init(1, torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(2)
        xb, yb = torch.randn(5, BATCH, D_IN, generator=g), torch.randint(0, CLASSES, (5, BATCH))
        batched = minibatch_grads(optimizee, params, xb, yb, chunk_size=2)
        for i in range(5):
            _, ref = grads_of(optimizee.loss, params, xb[i : i + 1], yb[i : i + 1])
            for a, b in zip(batched, ref):
                torch.testing.assert_close(a[i], b, atol=1e-6, rtol=1e-5)


def test_tail_index_lstm_matches_a_protocol_loop(tmp_path):
    opt = make_optimizer("lstm")
    module, _ = run(tmp_path, opt, [TailIndex(analysis_batches=6)], steps=1)
    snap, data = module.snapshot, TinyData()
    xb = data.train_x[: 6 * BATCH].view(6, 1, BATCH, D_IN)
    yb = data.train_y[: 6 * BATCH].view(6, 1, BATCH)
    grads = [grads_of(LEAKY.loss, snap.params, x, y)[1] for x, y in zip(xb, yb)]
    full = tuple(torch.stack(gs).mean(0) for gs in zip(*grads))
    with torch.no_grad():
        updates = [opt.update(g, snap.state, snap.params)[0] for g in grads]
        full_update = opt.update(full, snap.state, snap.params)[0]

    def flat(ps):
        return torch.cat([p.reshape(-1) for p in ps])

    for kind, rows, center in (("grad", grads, full), ("update", updates, full_update)):
        noise = torch.stack([flat(r) - flat(center) for r in rows])
        for stat, value in noise_alphas(noise).items():
            got = module.history[f"tail_index/{kind}/{stat}"][0][1]
            assert got == pytest.approx(value, rel=1e-4, abs=1e-9), (kind, stat)


def test_tail_index_analysis_set_is_whole_minibatches(tmp_path):
    cb = TailIndex(analysis_batches=3)
    run(tmp_path, SGD(lr=LR, momentum=0.0), [cb], steps=1)
    key, (xb, yb) = cb._cache
    assert key[0] == BATCH and xb.shape == (3, BATCH, D_IN) and yb.shape == (3, BATCH)
    data = TinyData()
    torch.testing.assert_close(xb.reshape(-1, D_IN), data.train_x[: 3 * BATCH])
    with pytest.raises(ValueError, match="analysis_batches"):
        TailIndex(analysis_batches=1)


def test_covariance_sgd_update_is_lr_squared_times_grad(tmp_path):
    cb = UpdateCovariance(every_n_steps=1, num_samples=64, seed=3)
    _, trainer = run(tmp_path, SGD(lr=LR, momentum=0.0), [cb])
    acc = events(trainer)
    for stat in ("top_eig", "trace"):
        grad, upd = logged(acc, f"covariance/grad/{stat}"), logged(acc, f"covariance/update/{stat}")
        assert sorted(grad) == list(range(1, STEPS + 1))
        for step, value in grad.items():
            assert value > 0
            assert upd[step] == pytest.approx(LR**2 * value, rel=1e-5), (stat, step)
    for step, value in logged(acc, "covariance/grad/top_eig").items():
        assert value <= logged(acc, "covariance/grad/trace")[step] * (1 + 1e-6)


def test_histogram_samples_are_the_update_magnitudes(tmp_path):
    cb = UpdateHistograms(every_n_steps=1, max_samples=10_000)  # more than the coordinates
    module, _ = run(tmp_path, SGD(lr=LR, momentum=0.0), [cb], steps=1)
    snap = module.snapshot
    mags = torch.cat([u.reshape(-1) for u in snap.updates]).abs().numpy()
    np.testing.assert_array_equal(cb.samples[1], mags)
    assert module.history["update_hist/mean_abs_update"][0][1] == pytest.approx(mags.mean())


# --------------------------------------------------------------------------- no side effects
@pytest.mark.parametrize("opt_name", ["lstm", "sgd_momentum"])
def test_callbacks_do_not_change_the_run(tmp_path, opt_name):
    def optimizer():
        return SGD(lr=LR, momentum=0.9) if opt_name == "sgd_momentum" else make_optimizer("lstm")

    plain, _ = run(tmp_path / "plain", optimizer(), steps=5)
    cbs = [
        SymmetryBreaking(),
        TailIndex(every_n_steps=2),
        UpdateCovariance(every_n_steps=2, num_samples=32),
        UpdateHistograms(every_n_steps=2),
    ]
    watched, _ = run(tmp_path / "watched", optimizer(), cbs, steps=5)
    assert watched.history["meta_test/train_loss"] == plain.history["meta_test/train_loss"]
    assert watched.history["meta_test/test_loss"] == plain.history["meta_test/test_loss"]
    for a, b in zip(watched.params, plain.params):
        assert torch.equal(a, b)


def test_works_without_a_logger(tmp_path):
    cbs = [UpdateHistograms(every_n_steps=1), SymmetryBreaking()]
    module, _ = run(tmp_path, SGD(lr=LR, momentum=0.0), cbs, steps=2, logger=False)
    assert sorted(cbs[0].samples) == [1, 2]
    assert len(module.history["symmetry/update/translation/abs_sum"]) == 2


# --------------------------------------------------------------------------- errors
class NotMetaTest(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def train_dataloader(self):
        return DataLoader(torch.randn(4, 2), batch_size=2)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("factory", list(ALL.values()), ids=list(ALL))
def test_error_on_a_fit_of_another_module(tmp_path, factory):
    trainer = L.Trainer(
        max_steps=1,
        logger=False,
        callbacks=[factory()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(MisconfigurationException, match="MetaTestSystem-like module"):
        trainer.fit(NotMetaTest())


@pytest.mark.parametrize("factory", [ALL["tail_index"], ALL["covariance"]])
def test_error_without_the_datamodule(tmp_path, factory):
    data = TinyData()
    module = MetaTestSystem(SGD(lr=LR, momentum=0.0), LEAKY, steps=STEPS)
    trainer = L.Trainer(
        inference_mode=False,
        logger=False,
        callbacks=[factory()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(MisconfigurationException, match="datamodule"):
        trainer.test(module, dataloaders=data.test_dataloader(), verbose=False)


def test_error_in_another_stage_and_bad_arguments():
    cb = SymmetryBreaking()
    module = MetaTestSystem(SGD(lr=LR, momentum=0.0), LEAKY)
    with pytest.raises(MisconfigurationException, match="Trainer.test"):
        cb.setup(L.Trainer(logger=False), module, "fit")
    with pytest.raises(ValueError, match="every_n_steps"):
        UpdateHistograms(every_n_steps=0)
    with pytest.raises(ValueError, match="num_samples"):
        UpdateCovariance(num_samples=1)
