"""``l2o.LearnedOptimizer``: any learned optimizer as a torch.optim.Optimizer."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from l2o import LearnedOptimizer
from l2o.checkpoints import CheckpointError
from l2o.lstm import LSTMOptimizer
from l2o.mlp_lopt import MLPLOpt
from tests.conftest import save_learned_optimizer


# --------------------------------------------------------------------------- fixtures
class Net(nn.Module):
    """Every kind of parameter shape: 4-D conv kernels, an embedding, biases, a 0-D scalar."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(7, 4)
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 * 4 * 4 + 4, 3)
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def forward(self, img, tok):
        h = F.relu(self.conv2(F.relu(self.conv1(img)))).flatten(1)
        return self.head(torch.cat([h, self.emb(tok)], 1)) * self.temperature


def _batches(n: int, seed: int = 1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 1, 8, 8, generator=gen, dtype=dtype),
            torch.randint(0, 7, (8,), generator=gen),
            torch.randint(0, 3, (8,), generator=gen),
        )
        for _ in range(n)
    ]


def _backward(model, batch):
    img, tok, y = batch
    loss = F.cross_entropy(model(img, tok), y)
    loss.backward()
    return loss


def _lopt(kind: str, seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return MLPLOpt() if kind == "mlp" else LSTMOptimizer(hidden_size=8)


class ScaledSGD(nn.Module):
    """A learned optimizer that is SGD with a learned rate: torch.optim.SGD is its ground truth."""

    name = "scaled_sgd"

    def __init__(self, rate: float = 0.1) -> None:
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(rate))

    def config(self) -> dict:
        return {"rate": self.rate.item()}

    def init_state(self, params):
        return {"step": 0}

    def update(self, grads, state, params=None):
        return tuple(-self.rate * g for g in grads), {"step": state["step"] + 1}


def _params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b, exact=False):
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


KINDS = ["mlp", "lstm"]


# --------------------------------------------------------------------------- the protocol
@pytest.mark.parametrize("kind", KINDS)
def test_step_equals_one_protocol_call_on_all_parameters(kind):
    """Per-parameter drop-in steps = the protocol run on all parameters at once (P = 1)."""
    net = _lopt(kind)
    model, ref = Net(), Net()
    opt = LearnedOptimizer(model.parameters(), learned_optimizer=net)
    ref_params = list(ref.parameters())
    state = None
    for batch in _batches(4):
        opt.zero_grad()
        _backward(model, batch)
        opt.step()
        ref.zero_grad()
        _backward(ref, batch)
        view = tuple(p.detach().unsqueeze(0) for p in ref_params)
        grads = tuple(p.grad.unsqueeze(0) for p in ref_params)
        with torch.no_grad():
            state = net.init_state(view) if state is None else state
            updates, state = net.update(grads, state, view)
            for p, u in zip(ref_params, updates):
                p.add_(u[0])
        _assert_same(_params_of(model), _params_of(ref))
    assert _params_of(model)[0].ne(_params_of(Net())[0]).any()  # it did move


def test_a_protocol_sgd_is_torch_sgd():
    """With groups, a scheduler and lr scaling, ScaledSGD through the drop-in = torch.optim.SGD."""
    model, ref = Net(), Net()

    def groups(m, lrs):
        return [
            {"params": [m.emb.weight, m.temperature], "lr": lrs[0]},
            {"params": [p for n, p in m.named_parameters() if n.startswith(("conv", "head"))]},
        ]

    opt = LearnedOptimizer(groups(model, (0.5,)), learned_optimizer=ScaledSGD(0.1), lr=2.0)
    sgd = torch.optim.SGD(groups(ref, (0.05,)), lr=0.2)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1) for o in (opt, sgd)]
    for batch in _batches(5):
        for o, m in ((opt, model), (sgd, ref)):
            o.zero_grad()
            _backward(m, batch)
            o.step()
        for s in scheds:
            s.step()
        _assert_same(_params_of(model), _params_of(ref))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * 0.01, 2.0 * 0.01])


# --------------------------------------------------------------------------- lr, scheduler
@pytest.mark.parametrize("kind", KINDS)
def test_lr_scales_the_learned_update_and_a_scheduler_changes_it(kind):
    model = Net().double()  # float64: the comparison below is not lost in rounding
    opt = LearnedOptimizer(model.parameters(), learned_optimizer=_lopt(kind), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.25)
    for i, batch in enumerate(_batches(4, dtype=torch.float64)):
        opt.zero_grad()
        _backward(model, batch)
        # the same step at lr = 1 from a copy of the model and optimizer
        twin_model, twin = copy.deepcopy((model, opt))
        for g in twin.param_groups:
            g["lr"] = 1.0
        for t, p in zip(twin_model.parameters(), model.parameters()):
            t.grad = p.grad.clone()  # a Parameter's deepcopy leaves .grad behind
        before = _params_of(model)
        opt.step()
        twin.step()
        lr = 1.0 if i < 2 else 0.25
        assert opt.param_groups[0]["lr"] == lr
        for b, p, t in zip(before, model.parameters(), twin_model.parameters()):
            torch.testing.assert_close(p - b, lr * (t.detach() - b), atol=1e-13, rtol=1e-9)
        sched.step()


# --------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_continues_bit_identically(kind):
    net = _lopt(kind)
    batches = _batches(6)
    model = Net()
    opt = LearnedOptimizer(model.parameters(), learned_optimizer=net)
    for batch in batches[:3]:
        opt.zero_grad()
        _backward(model, batch)
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for batch in batches[3:]:
        opt.zero_grad()
        _backward(model, batch)
        opt.step()

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = Net(seed=99)
    resumed.load_state_dict(saved["model"])
    opt2 = LearnedOptimizer(resumed.parameters(), learned_optimizer=net)
    opt2.load_state_dict(saved["opt"])
    for batch in batches[3:]:
        opt2.zero_grad()
        _backward(resumed, batch)
        opt2.step()
    _assert_same(_params_of(model), _params_of(resumed), exact=True)


def test_state_dict_of_another_optimizer_is_refused():
    model = Net()
    lstm_opt = LearnedOptimizer(model.parameters(), learned_optimizer=_lopt("lstm"))
    _backward(model, _batches(1)[0])
    lstm_opt.step()
    mlp_opt = LearnedOptimizer(model.parameters(), learned_optimizer=_lopt("mlp"))
    with pytest.raises(ValueError, match="saved by another optimizer"):
        mlp_opt.load_state_dict(lstm_opt.state_dict())


# --------------------------------------------------------------------------- torch.optim ways
def test_frozen_parameters_are_skipped_and_add_param_group_unfreezes():
    model = Net()
    model.conv1.requires_grad_(False)  # a frozen layer: its .grad stays None
    opt = LearnedOptimizer(
        [p for n, p in model.named_parameters() if not n.startswith("conv1")],
        learned_optimizer=_lopt("mlp"),
    )
    frozen = [model.conv1.weight.detach().clone(), model.conv1.bias.detach().clone()]
    batches = _batches(4)
    for batch in batches[:2]:
        opt.zero_grad()
        _backward(model, batch)
        opt.step()
    assert torch.equal(model.conv1.weight, frozen[0]) and torch.equal(model.conv1.bias, frozen[1])
    # in the optimizer but without a gradient (e.g. unused this step): skipped silently too
    opt.zero_grad()
    _backward(model, batches[2])
    model.temperature.grad = None
    t_before = model.temperature.detach().clone()
    step_before = opt.state[model.temperature]["step"]
    opt.step()
    assert torch.equal(model.temperature, t_before)
    assert opt.state[model.temperature]["step"] == step_before
    # unfreeze: add_param_group with its own lr
    model.conv1.requires_grad_(True)
    opt.add_param_group({"params": model.conv1.parameters(), "lr": 0.5})
    assert opt.param_groups[-1]["lr"] == 0.5 and len(opt.param_groups) == 2
    opt.zero_grad()
    _backward(model, batches[3])
    opt.step()
    assert not torch.equal(model.conv1.weight, frozen[0])
    assert opt.state[model.conv1.weight]["step"] == 1


def test_zero_grad_sets_none_and_closure_returns_its_loss():
    model, ref = Net(), Net()
    net = _lopt("mlp")
    opt = LearnedOptimizer(model.parameters(), learned_optimizer=net)
    ref_opt = LearnedOptimizer(ref.parameters(), learned_optimizer=net)
    batch = _batches(1)[0]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        assert torch.is_grad_enabled()
        return _backward(model, batch)

    loss = opt.step(closure)
    assert len(calls) == 1
    ref_opt.zero_grad()
    ref_loss = _backward(ref, batch)
    ref_opt.step()
    assert loss.item() == ref_loss.item()
    _assert_same(_params_of(model), _params_of(ref), exact=True)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_step_hooks_fire():
    model = Net()
    opt = LearnedOptimizer(model.parameters(), learned_optimizer=_lopt("mlp"))
    events = []
    opt.register_step_pre_hook(lambda o, args, kwargs: events.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: events.append(("post", o is opt)))
    _backward(model, _batches(1)[0])
    opt.step()
    assert events == [("pre", True), ("post", True)]


@pytest.mark.parametrize("kind", KINDS)
def test_deepcopy_keeps_the_meta_network(kind):
    model = Net()
    opt = LearnedOptimizer(model.parameters(), learned_optimizer=_lopt(kind))
    batches = _batches(3)
    _backward(model, batches[0])
    opt.step()
    alone = copy.deepcopy(opt)
    assert alone.learned_optimizer is not opt.learned_optimizer
    assert type(alone.learned_optimizer) is type(opt.learned_optimizer)
    ref_weights = opt.learned_optimizer.state_dict()
    for k, v in alone.learned_optimizer.state_dict().items():
        assert torch.equal(v, ref_weights[k])
    # a model and its optimizer copied together continue exactly like the original
    model2, opt2 = copy.deepcopy((model, opt))
    for m, o in ((model, opt), (model2, opt2)):
        for batch in batches[1:]:
            o.zero_grad()
            _backward(m, batch)
            o.step()
    _assert_same(_params_of(model), _params_of(model2), exact=True)
    # and pickling (torch.save of the optimizer object) keeps it too
    buf = io.BytesIO()
    torch.save(opt, buf)
    buf.seek(0)
    assert isinstance(
        torch.load(buf, weights_only=False).learned_optimizer, type(opt.learned_optimizer)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_in_place_and_float64_kept(kind):
    net = _lopt(kind)
    model = Net().double()
    ref = Net().double()
    opt = LearnedOptimizer(model.parameters(), learned_optimizer=net)
    storage = [p.data_ptr() for p in model.parameters()]
    batch = _batches(1, dtype=torch.float64)[0]
    _backward(model, batch)
    opt.step()
    assert [p.data_ptr() for p in model.parameters()] == storage
    assert all(p.dtype == torch.float64 for p in model.parameters())
    state = opt.state[model.conv1.weight]
    assert all(v.dtype == torch.float64 for v in state.values() if isinstance(v, torch.Tensor))
    # float64 arithmetic, not float32 rounded: the float64 protocol to 1e-12
    _backward(ref, batch)
    with torch.no_grad():
        for p in ref.parameters():
            view = (p.detach().unsqueeze(0),)
            st = net.double().init_state(view)
            (u,), _ = net.update((p.grad.unsqueeze(0),), st, view)
            p.add_(u[0])
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    assert next(opt.learned_optimizer.parameters()).dtype == torch.float32  # its copy converted


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    net = _lopt(kind)
    cpu, gpu = Net(), Net().cuda()
    opt_c = LearnedOptimizer(cpu.parameters(), learned_optimizer=net)
    opt_g = LearnedOptimizer(gpu.parameters(), learned_optimizer=net)
    for batch in _batches(3):
        for m, o, dev in ((cpu, opt_c, "cpu"), (gpu, opt_g, "cuda")):
            o.zero_grad()
            _backward(m, tuple(t.to(dev) for t in batch))
            o.step()
    assert all(p.is_cuda for p in gpu.parameters())
    assert all(v.is_cuda for s in opt_g.state.values() for v in s.values() if torch.is_tensor(v))
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(a, b.cpu(), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- bad input
def test_bad_inputs_get_clear_errors(tmp_path):
    model = Net()
    with pytest.raises(ValueError, match="checkpoint=PATH"):
        LearnedOptimizer(model.parameters())
    with pytest.raises(ValueError, match="not both"):
        LearnedOptimizer(model.parameters(), checkpoint="x.ckpt", learned_optimizer=MLPLOpt())
    with pytest.raises(ValueError, match="is a class"):
        LearnedOptimizer(model.parameters(), learned_optimizer=MLPLOpt)
    with pytest.raises(TypeError, match="optimizer protocol"):
        LearnedOptimizer(model.parameters(), learned_optimizer=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="lr must be"):
        LearnedOptimizer(model.parameters(), learned_optimizer=MLPLOpt(), lr=-1.0)
    # a checkpoint that is not a learned optimizer's
    not_lopt = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict()}, not_lopt)
    with pytest.raises(CheckpointError, match="not an l2o-dynamics learned-optimizer checkpoint"):
        LearnedOptimizer(model.parameters(), checkpoint=not_lopt)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        LearnedOptimizer(model.parameters(), checkpoint=garbage)


def test_sparse_gradient_refused_before_any_update():
    emb = nn.Embedding(10, 3, sparse=True)
    dense = nn.Linear(3, 2)
    opt = LearnedOptimizer([*dense.parameters(), emb.weight], learned_optimizer=MLPLOpt())
    dense(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in dense.parameters()]
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, dense.parameters()))


def _write_checkpoint(path, net: nn.Module, class_path: str) -> None:
    """A meta-training checkpoint in the format of the learned-optimizer contract."""
    optimizee = {"sizes": [784, 20, 10], "activation": "leaky_relu", "batchnorm": False,
                 "negative_slope": 0.01, "bn_eps": 1e-5}  # fmt: skip
    save_learned_optimizer(path, net, class_path, optimizee)


@pytest.mark.parametrize("kind", KINDS)
def test_from_checkpoint(tmp_path, kind):
    net = _lopt(kind, seed=11)
    cls = type(net)
    other = LSTMOptimizer if cls is MLPLOpt else MLPLOpt
    path = tmp_path / "last.ckpt"
    _write_checkpoint(path, net, f"{cls.__module__}.{cls.__qualname__}")
    model, ref = Net(), Net()
    opt = LearnedOptimizer(model.parameters(), checkpoint=path)
    checked = LearnedOptimizer(ref.parameters(), checkpoint=str(path), learned_optimizer=cls)
    assert type(opt.learned_optimizer) is cls and not opt.learned_optimizer.training
    for k, v in net.state_dict().items():
        assert torch.equal(opt.learned_optimizer.state_dict()[k], v)
    for m, o in ((model, opt), (ref, checked)):
        _backward(m, _batches(1)[0])
        o.step()
    _assert_same(_params_of(model), _params_of(ref), exact=True)
    with pytest.raises(CheckpointError, match=f"not the {other.__module__}.{other.__qualname__}"):
        LearnedOptimizer(model.parameters(), checkpoint=path, learned_optimizer=other)


# --------------------------------------------------------------------------- Lightning
def test_trains_under_lightning_with_a_scheduler():
    """configure_optimizers -> the drop-in + StepLR under lightning.Trainer: the same trajectory as
    a hand-written loop, and a learned optimizer that is SGD lowers the loss."""
    import lightning as L

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen)
    y = (x @ torch.randn(5, 1, generator=gen)).squeeze(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)

    class Module(L.LightningModule):
        def __init__(self, lopt):
            super().__init__()
            torch.manual_seed(0)
            self.layer = nn.Linear(5, 1)
            self.lopt = lopt

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.layer(batch[0]).squeeze(1), batch[1])

        def configure_optimizers(self):
            opt = LearnedOptimizer(self.layer.parameters(), learned_optimizer=self.lopt)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    for lopt in (ScaledSGD(0.1), _lopt("mlp")):
        module = Module(lopt)
        trainer = L.Trainer(
            max_steps=8,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, loader)
        # the same by hand
        ref = Module(lopt)
        opt = ref.configure_optimizers()
        steps = 0
        while steps < 8:
            for batch in loader:
                if steps == 8:
                    break
                opt["optimizer"].zero_grad()
                ref.training_step(batch, 0).backward()
                opt["optimizer"].step()
                opt["lr_scheduler"]["scheduler"].step()
                steps += 1
        _assert_same(_params_of(module.layer), _params_of(ref.layer))
        assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.25)
        if isinstance(lopt, ScaledSGD):
            with torch.no_grad():
                start = F.mse_loss(Module(lopt).layer(x).squeeze(1), y)
                end = F.mse_loss(module.layer(x).squeeze(1), y)
            assert end < 0.7 * start, (start, end)


# --------------------------------------------------------------------------- found in the audit
@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_parameter_is_skipped(kind):
    """A zero-element parameter (e.g. a 0-width layer) has nothing to update; the others step
    exactly as without it (the protocol cannot run on 0 coordinates)."""
    net = _lopt(kind)
    empty = nn.Parameter(torch.zeros(0, 3))
    model, ref = Net(), Net()
    opt = LearnedOptimizer([empty, *model.parameters()], learned_optimizer=net)
    ref_opt = LearnedOptimizer(ref.parameters(), learned_optimizer=net)
    for batch in _batches(2):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            _backward(m, batch)
        empty.grad = torch.zeros(0, 3)
        opt.step()
        ref_opt.step()
    assert empty.shape == (0, 3) and empty not in opt.state
    _assert_same(_params_of(model), _params_of(ref), exact=True)


def _stepped(net, batches, model=None):
    model = model or Net()
    opt = LearnedOptimizer(model.parameters(), learned_optimizer=net)
    for batch in batches:
        opt.zero_grad()
        _backward(model, batch)
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_state_dict_leaves_the_optimizer_as_it_was(kind):
    """Adam's state dict, or one of the same class with another config (other state sizes),
    is refused with a clear error at load time, and the optimizer continues untouched."""
    batches = _batches(4)
    net = _lopt(kind)
    other = MLPLOpt(momentum_decays=[0.5, 0.9]) if kind == "mlp" else LSTMOptimizer(hidden_size=4)
    adam_model = Net()
    adam = torch.optim.Adam(adam_model.parameters())
    _backward(adam_model, batches[0])
    adam.step()
    _, other_opt = _stepped(other, batches[:1])
    model, opt = _stepped(net, batches[:2])
    twin_model, twin = copy.deepcopy((model, opt))
    with pytest.raises(ValueError, match="saved by another optimizer"):
        opt.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match=f"saved with another {type(net).__name__} config"):
        opt.load_state_dict(other_opt.state_dict())
    assert set(opt.param_groups[0]) == {"params", "lr"}
    for m, o in ((model, opt), (twin_model, twin)):
        for batch in batches[2:]:
            o.zero_grad()
            _backward(m, batch)
            o.step()
    _assert_same(_params_of(model), _params_of(twin_model), exact=True)


def test_resumes_under_lightning_from_its_checkpoint(tmp_path):
    """Lightning saves the drop-in's and the scheduler's state in its checkpoint: fit 1 epoch,
    resume to 2 from the checkpoint = 2 epochs straight, bit for bit."""
    import lightning as L

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen)
    y = (x @ torch.randn(5, 1, generator=gen)).squeeze(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    lopt = _lopt("mlp")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = nn.Linear(5, 1)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.layer(batch[0]).squeeze(1), batch[1])

        def configure_optimizers(self):
            opt = LearnedOptimizer(self.layer.parameters(), learned_optimizer=lopt)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def fit(epochs, ckpt_path=None):  # 4 steps an epoch
        module = Module()
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return module, trainer

    straight, _ = fit(2)
    # a finished epoch (a max_steps stop would replay the epoch on resume, torch's SGD too)
    _, first = fit(1)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed, trainer = fit(2, ckpt_path=tmp_path / "half.ckpt")
    assert trainer.optimizers[0].state[resumed.layer.weight]["step"] == 8
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.25)
    _assert_same(_params_of(straight.layer), _params_of(resumed.layer), exact=True)
