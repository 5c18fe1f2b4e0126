"""tpSGD: delta rule, DRTP equivalence, one graph at a time, learning on digits, errors, resume."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.datasets import load_digits
from torch import nn
from transformers import TrainingArguments

from hf_lowrank.tpsgd import InputsLabelsDataset, LastTimeStep, TpSGDConfig, TpSGDModel, TpSGDTrainer
from hf_lowrank.tpsgd.projection import local_loss_and_grad, projection_matrix, task_loss, task_loss_and_grad


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    X = torch.tensor(X / 16.0, dtype=torch.float32)[perm]
    return X, torch.tensor(y)[perm]


def make_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=16, learning_rate=1e-3, report_to=[], use_cpu=True,
        disable_tqdm=True, save_strategy="no", lr_scheduler_type="constant", max_grad_norm=0.0, seed=0,
        logging_steps=1000,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def mlp(seed=0, sizes=(64, 32, 32, 10)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def test_mse_local_loss_is_the_delta_rule(tmp_path):
    """One SGD step equals dW1 = -lr/B sum[(h1 - tanh(y*P)) * (1 - h1^2)] x^T and the output delta rule."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, labels = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    cfg = TpSGDConfig(local_loss="mse", target_activation="tanh", optimizer="sgd", seed=7)
    lr = 0.1
    trainer = TpSGDTrainer(model=net, args=make_args(tmp_path, learning_rate=lr), tpsgd_config=cfg)
    W1, b1, W2, b2 = (p.detach().clone() for p in net.parameters())

    y = F.one_hot(labels, 3).double()
    h1 = torch.tanh(x @ W1.T + b1)
    target = torch.tanh(y @ projection_matrix("gaussian", 1.0, 7, 0, 3, 4).double())
    delta1 = (h1 - target) * (1 - h1**2)
    delta2 = torch.softmax(h1 @ W2.T + b2, dim=1) - y
    expected = [
        W1 - lr * delta1.T @ x / 6, b1 - lr * delta1.mean(0), W2 - lr * delta2.T @ h1 / 6, b2 - lr * delta2.mean(0)
    ]

    trainer.create_optimizer()
    trainer.training_step(trainer.model, {"inputs": x, "labels": labels})
    trainer.optimizer.step()
    for got, want in zip(net.parameters(), expected):
        torch.testing.assert_close(got.detach(), want)


class _DRTPHook(torch.autograd.Function):
    """Test oracle written from the DRTP paper: backward returns labels @ B instead of the incoming gradient."""

    @staticmethod
    def forward(ctx, h, labels, B):
        ctx.save_for_backward(labels, B)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        labels, B = ctx.saved_tensors
        return (labels @ B).view_as(grad), None, None


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_drtp_mode_matches_drtp_update(kind):
    """mode='drtp' gives exactly DRTP's gradients: hooks after the activation (before pooling), BCE output."""
    torch.manual_seed(1)
    if kind == "mlp":
        net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 4)).double()
        x = torch.randn(5, 12, dtype=torch.float64)
    else:
        net = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 10), nn.Tanh(),
            nn.Linear(10, 4),
        ).double()
        x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 2, 3])
    cfg = TpSGDConfig(mode="drtp", projection="kaiming_uniform", output_loss="bce", seed=3)
    model = TpSGDModel(net, cfg)
    model.local_step(x, labels)
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()

    y = F.one_hot(labels, 4).double()
    h, hidden = x, 0
    for block in model.plan.blocks[:-1]:
        h = block.module(h)
        for act in block.activations:
            h = act(h)
        B = projection_matrix("kaiming_uniform", 1.0, 3, hidden, 4, h[0].numel()).double()
        # DRTP draws B with kaiming_uniform_ on (classes, width): bound sqrt(6 / width)
        assert B.abs().max() <= (6.0 / h[0].numel()) ** 0.5
        h = _DRTPHook.apply(h, y, B)
        for module in block.rest:
            h = module(h)
        hidden += 1
    F.binary_cross_entropy_with_logits(model.plan.output.module(h), y).backward()
    for g, want in zip(got, (p.grad for p in net.parameters())):
        torch.testing.assert_close(g, want)


@pytest.mark.parametrize("loss", ["mse", "l1", "bce", "cross_entropy"])
def test_closed_form_local_gradients_match_autograd(loss):
    torch.manual_seed(0)
    h = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    target = torch.rand(4, 6, dtype=torch.float64)
    target = target / target.sum(1, keepdim=True) if loss == "cross_entropy" else target
    value, grad = local_loss_and_grad(loss, h, target)
    reference = {
        "mse": lambda: 0.5 * (h - target).square().sum() / 4,
        "l1": lambda: (h - target).abs().sum() / 4,
        "bce": lambda: F.binary_cross_entropy(torch.sigmoid(h), target, reduction="sum") / 4,
        "cross_entropy": lambda: F.cross_entropy(h, target),
    }[loss]()
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(grad, torch.autograd.grad(reference, h)[0])


@pytest.mark.parametrize("loss", ["cross_entropy", "bce", "mse"])
def test_closed_form_task_loss_matches_autograd(loss):
    torch.manual_seed(0)
    logits = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    labels = F.one_hot(torch.tensor([0, 4, 2, 2]), 5).double()
    reference = task_loss(loss, logits, labels)
    value, grad = task_loss_and_grad(loss, logits.detach(), labels)
    torch.testing.assert_close(value, reference.detach())
    torch.testing.assert_close(grad, torch.autograd.grad(reference, logits)[0])


def test_only_one_layer_graph_alive_and_less_than_bp():
    torch.manual_seed(0)
    x, labels = torch.randn(32, 64), torch.randint(0, 10, (32,))
    sizes = (64, 128, 128, 128, 128, 10)
    peaks = {}
    for mode in ("tpsgd", "bp"):
        model = TpSGDModel(mlp(sizes=sizes), TpSGDConfig(mode=mode))
        with model.memory.track("bp"):
            if mode == "tpsgd":
                model.local_step(x, labels)
            else:
                model(x, labels).loss.backward()
        report = model.memory.report()
        assert report["live_saved_bytes"] == 0  # every graph was freed
        peaks[mode] = report
    tp = peaks["tpsgd"]
    assert tp["max_layers_alive"] == 1
    assert set(tp["peak_saved_bytes_per_layer"]) == {0, 1, 2, 3, 4}
    # a layer saves only its input: the tanh derivative and the local (and task) loss gradients are formed in
    # the forward pass, so neither the tanh output nor the logits are saved
    assert tp["peak_saved_bytes_per_layer"] == {0: 32 * 64 * 4, 1: 32 * 128 * 4, 2: 32 * 128 * 4,
                                                3: 32 * 128 * 4, 4: 32 * 128 * 4}
    # backprop keeps the input and every hidden activation at once
    assert peaks["bp"]["peak_saved_bytes"] >= 32 * (64 + 4 * 128) * 4
    # tpSGD's peak is one 128-wide input: 1 of the 5 activations backprop holds (plus BP's logits)
    assert tp["peak_saved_bytes"] == 32 * 128 * 4 < peaks["bp"]["peak_saved_bytes"] / 4


@pytest.mark.parametrize("cell", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_unrolled_layers_match_module_and_skip_bptt(cell):
    torch.manual_seed(0)
    net = nn.Sequential(cell(8, 12, num_layers=2, batch_first=True), LastTimeStep(), nn.Linear(12, 10))
    model = TpSGDModel(net, TpSGDConfig())
    x, labels = torch.randn(6, 8, 8), torch.randint(0, 10, (6,))
    expected = F.cross_entropy(model(x).logits, labels)
    loss, local_losses = model.local_step(x, labels)
    torch.testing.assert_close(loss, expected)  # the unrolled cells compute the module's forward
    assert len(local_losses) == 2 and all(p.grad is not None for p in net.parameters())
    assert model.memory.report()["max_layers_alive"] == 1
    # each time step is its own graph: peak is far below one layer's full unrolled sequence
    step_bytes = model.memory.report()["peak_saved_bytes_per_layer"][1]
    assert step_bytes < 6 * 8 * 12 * 4 * 8


@pytest.mark.parametrize("recurrent_projection,step_weights", [("shared", "uniform"), ("per_step", "linear")])
def test_recurrent_targets_shared_or_per_step(recurrent_projection, step_weights):
    """Gradients equal sum_t w_t 0.5||h_t - tanh(y* P_t)||^2 / B with h_{t-1} constant; P_t = P unless per_step,
    w_t = 1/T (uniform) or t/(1+2+3) (linear)."""
    torch.manual_seed(0)
    gru = nn.GRU(3, 6, batch_first=True)
    cfg = TpSGDConfig(seed=2, recurrent_projection=recurrent_projection, recurrent_step_weights=step_weights)
    model = TpSGDModel(nn.Sequential(gru, LastTimeStep(), nn.Linear(6, 4)), cfg)
    x, labels = torch.randn(5, 3, 3), torch.tensor([0, 1, 2, 3, 1])
    per_step = recurrent_projection == "per_step"
    projections = [projection_matrix("gaussian", 1.0, 2, 0, 4, 6, t if per_step else None) for t in range(3)]
    assert torch.equal(projections[0], projection_matrix("gaussian", 1.0, 2, 0, 4, 6)) != per_step
    assert torch.equal(projections[0], projections[1]) != per_step

    step_weight = [1 / 3] * 3 if step_weights == "uniform" else [1 / 6, 2 / 6, 3 / 6]
    y, h, expected = F.one_hot(labels, 4).float(), torch.zeros(5, 6), 0.0
    for t in range(3):
        h = torch.gru_cell(x[:, t], h.detach(), gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0)
        expected = expected + step_weight[t] * 0.5 * (h - torch.tanh(y @ projections[t])).square().sum() / 5
    weights = list(gru.parameters())
    want = torch.autograd.grad(expected, weights)
    _, local_losses = model.local_step(x, labels)
    torch.testing.assert_close(local_losses[0], expected.item())
    for got, grad in zip(weights, want):
        torch.testing.assert_close(got.grad, grad)


def _train(tmp_path, net, cfg, X, y, epochs=4, **kw):
    args = make_args(tmp_path, num_train_epochs=epochs, per_device_train_batch_size=32, logging_steps=10, **kw)
    trainer = TpSGDTrainer(model=net, args=args, tpsgd_config=cfg, train_dataset=InputsLabelsDataset(X, y))
    trainer.train()
    return trainer, [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_loss_falls_on_digits_mlp_and_logs_memory(tmp_path, digits):
    X, y = digits
    trainer, losses = _train(tmp_path, mlp(sizes=(64, 128, 128, 10)), TpSGDConfig(), X[:1200], y[:1200])
    assert losses[-1] < 0.4 * losses[0]
    logits = trainer.predict(InputsLabelsDataset(X[1200:], y[1200:])).predictions
    assert (logits.argmax(-1) == y[1200:].numpy()).mean() > 0.85
    logged = [log for log in trainer.state.log_history if "loss" in log][-1]
    assert logged["peak_saved_activation_bytes"] > 0 and "local_loss_1" in logged


@pytest.mark.parametrize("kind", ["cnn", "gru"])
def test_loss_falls_on_digits_cnn_and_rnn(tmp_path, digits, kind):
    X, y = digits
    torch.manual_seed(0)
    if kind == "cnn":
        X = X.view(-1, 1, 8, 8)
        net = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                            nn.Linear(256, 64), nn.Tanh(), nn.Linear(64, 10))
    else:
        X = X.view(-1, 8, 8)
        net = nn.Sequential(nn.GRU(8, 64, batch_first=True), LastTimeStep(), nn.Linear(64, 10))
    _, losses = _train(tmp_path, net, TpSGDConfig(), X[:800], y[:800], epochs=4, learning_rate=3e-3)
    assert losses[-1] < 0.75 * losses[0]


def test_projections_come_from_the_seed_only():
    a, b = TpSGDModel(mlp(), TpSGDConfig(seed=5)), TpSGDModel(mlp(), TpSGDConfig(seed=5))
    c = TpSGDModel(mlp(), TpSGDConfig(seed=6))
    like = torch.zeros(1)
    torch.testing.assert_close(a.projection(0, 32, like), b.projection(0, 32, like))
    assert not torch.equal(a.projection(0, 32, like), c.projection(0, 32, like))
    assert not torch.equal(a.projection(0, 32, like), a.projection(1, 32, like))
    assert all(k.startswith("network.") for k in a.state_dict())


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="'1'.*BatchNorm1d"):
        TpSGDModel(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    with pytest.raises(TypeError, match="nn.Sequential"):
        TpSGDModel(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="bidirectional"):
        TpSGDModel(nn.Sequential(nn.GRU(4, 4, bidirectional=True), LastTimeStep(), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="local_loss='hinge'.*mse, l1, bce, cross_entropy"):
        TpSGDConfig(local_loss="hinge")
    with pytest.raises(ValueError, match="target_activation='tanh'.*bce"):
        TpSGDConfig(local_loss="bce", target_activation="tanh")
    with pytest.raises(ValueError, match="recurrent_projection='every'.*shared, per_step"):
        TpSGDConfig(recurrent_projection="every")
    with pytest.raises(ValueError, match="recurrent_step_weights='last'.*uniform, linear"):
        TpSGDConfig(recurrent_step_weights="last")
    with pytest.raises(ValueError, match="per_step.*mode='drtp'.*one fixed B"):
        TpSGDConfig(mode="drtp", recurrent_projection="per_step")
    with pytest.raises(ValueError, match="num_labels=5.*10 outputs"):
        TpSGDModel(mlp(), TpSGDConfig(num_labels=5))
    with pytest.raises(ValueError, match="lists 3 losses.*2 hidden"):
        TpSGDModel(mlp(), TpSGDConfig(local_loss=["mse", "l1", "bce"]))
    model = TpSGDModel(mlp())
    with pytest.raises(ValueError, match="class 12.*P have 10 rows"):
        model.local_step(torch.randn(3, 64), torch.tensor([1, 12, 3]))
    with pytest.raises(ValueError, match="7 columns.*P have 10 rows"):
        model.local_step(torch.randn(3, 64), torch.rand(3, 7))


def test_resume_reproduces_uninterrupted_run(tmp_path, digits):
    X, y = digits
    data = InputsLabelsDataset(X[:192], y[:192])
    cfg = TpSGDConfig(optimizer="momentum", seed=3)

    def trainer(out, **kw):
        args = make_args(out, max_steps=6, save_strategy="steps", save_steps=3, **kw)
        return TpSGDTrainer(model=mlp(seed=1), args=args, tpsgd_config=cfg, train_dataset=data)

    straight = trainer(tmp_path / "a")
    straight.train()
    resumed = trainer(tmp_path / "b")
    resumed.train()  # writes checkpoint-3 and checkpoint-6; resume a fresh trainer from checkpoint-3
    fresh = trainer(tmp_path / "b")
    fresh.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))
    for p, q in zip(straight.model.parameters(), fresh.model.parameters()):
        torch.testing.assert_close(p, q)

    ckpt = tmp_path / "b" / "checkpoint-3"
    assert all(k.startswith("network.") for k in load_file(ckpt / "model.safetensors"))
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(state["param_groups"]) == 3  # one group per layer
    assert json.loads((ckpt / "tpsgd_config.json").read_text())["seed"] == 3

    other = TpSGDTrainer(model=mlp(seed=1), args=make_args(tmp_path / "c", max_steps=6),
                         tpsgd_config=TpSGDConfig(seed=4), train_dataset=data)
    with pytest.raises(ValueError, match="seed: saved 3, now 4"):
        other.train(resume_from_checkpoint=str(ckpt))
    assert os.path.isdir(ckpt)


def test_fused_step_matches_autograd_through_the_activation():
    """The forward-mode derivative of GELU + dropout gives the same gradients as backprop through them, and a
    conv layer keeps only its input for the update."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.GELU(), nn.Dropout(0.3), nn.Flatten(),
                        nn.Linear(32, 5), nn.Sigmoid()).double()
    model = TpSGDModel(net, TpSGDConfig(seed=1, num_labels=5)).train()
    x, labels = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 4, 2])
    torch.manual_seed(9)
    model.local_step(x, labels)
    got = [p.grad.clone() for p in net.parameters()]

    torch.manual_seed(9)  # the same dropout mask
    y = F.one_hot(labels, 5).double()
    h = net[2](net[1](net[0](x)))
    target = torch.tanh(y @ projection_matrix("gaussian", 1.0, 1, 0, 5, 32).double())
    local = 0.5 * (h.flatten(1) - target).square().sum() / 3
    task = F.cross_entropy(net[5](net[4](net[3](h.detach()))), y)
    want = torch.autograd.grad(local, list(net[0].parameters())) + torch.autograd.grad(task, list(net[4].parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert model.memory.report()["peak_saved_bytes_per_layer"][0] == 3 * 16 * 8  # the conv input only
