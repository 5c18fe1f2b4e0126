"""CUBER / GPM continual learning: energy criterion, GPM invariance, correlation test, metrics, resume, errors."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers import PrinterCallback, TrainingArguments

from hf_lowrank.cuber import (
    AccuracyMatrix,
    ContinualConfig,
    ContinualTrainer,
    LayerProjection,
    RepresentationRecorder,
    ScaledWeightProjection,
    average_accuracy,
    backward_transfer,
    basis_from_covariance,
    correlation_test,
    energy_rank,
    extend_basis,
)
from hf_lowrank.cuber.memory import LayerMemory, weight_matrix
from hf_lowrank.cuber.projection import REGIME_POSITIVE, REGIME_STRONG, REGIME_WEAK


# ----------------------------------------------------------------------------- fixtures
class TinyNet(nn.Module):
    """Linear (or Conv2d) body with biases, shared or per-task heads; returns {'loss', 'logits'}."""

    def __init__(self, dim=24, hidden=64, classes=3, conv=False, heads=0):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1) if conv else None
        self.lin1 = nn.Linear(4 * dim if conv else dim, hidden)
        self.lin2 = nn.Linear(hidden, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, classes) for _ in range(heads)) if heads else None
        self.head = None if heads else nn.Linear(hidden, classes)

    def forward(self, x, labels=None, task_id=None):
        if self.conv is not None:
            side = int(math.isqrt(x.shape[-1]))
            x = torch.relu(self.conv(x.view(-1, 1, side, side))).flatten(1)
        h = torch.relu(self.lin2(torch.relu(self.lin1(x))))
        logits = self.heads[task_id](h) if self.heads is not None else self.head(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Rows(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def low_rank_task(seed, n=40, dim=24, rank=6, classes=3):
    """Inputs in a random ``rank``-dim subspace (room left for later tasks), labels from a random linear rule."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g))[0]
    x = torch.randn(n, rank, generator=g) @ basis.T
    y = (x @ torch.randn(dim, classes, generator=g)).argmax(1)
    return Rows(x, y)


def make_trainer(tmp_path, model, optim="sgd", lr=0.05, epochs=2, seed=0, **config):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=64, num_train_epochs=epochs,
        learning_rate=lr, optim=optim, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, seed=seed,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
    )
    config.setdefault("save_state", False)
    trainer = ContinualTrainer(model=model, args=args, continual_config=ContinualConfig(**config))
    trainer.remove_callback(PrinterCallback)
    return trainer


def known_spectrum(energies, dim=8, rows=30, seed=0):
    """A representation matrix (``rows x dim``) whose squared singular values are exactly ``energies``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(rows, len(energies), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(dim, len(energies), generator=g, dtype=torch.float64))[0]
    return u @ torch.diag(torch.tensor(energies, dtype=torch.float64).sqrt()) @ v.T, v


# ----------------------------------------------------------------------------- energy criterion
@pytest.mark.parametrize("threshold, expected", [(0.3, 1), (0.65, 2), (0.75, 3), (0.95, 4), (1.0, 4)])
def test_energy_criterion_keeps_exact_number_of_directions(threshold, expected):
    rep, v = known_spectrum([4.0, 3.0, 2.0, 1.0])
    basis = basis_from_covariance(rep.T @ rep, threshold)
    assert basis.shape == (8, expected)
    # the kept directions are the top right-singular vectors (up to sign)
    overlap = (basis.double().T @ v[:, :expected]).abs()
    torch.testing.assert_close(overlap.diagonal(), torch.ones(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    assert energy_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]), threshold, 10.0) == expected


def test_incremental_basis_adds_only_new_directions():
    rep, v = known_spectrum([4.0, 3.0, 2.0, 1.0])
    cov = rep.T @ rep
    first = v[:, :1].float()  # basis already holding 40% of the energy
    grown = extend_basis(first, cov, 0.65)  # needs 65%: exactly one more direction, the 30% one
    assert grown.shape == (8, 2)
    torch.testing.assert_close(grown[:, :1], first)
    assert abs(float(grown[:, 1].double() @ v[:, 1])) == pytest.approx(1.0, abs=1e-6)
    assert extend_basis(first, cov, 0.35).shape == (8, 1)  # already explained: nothing added
    torch.testing.assert_close(grown.T @ grown, torch.eye(2), atol=1e-5, rtol=0)


def test_representation_rows_linear_tokens_and_conv_im2col():
    lin, conv = nn.Linear(6, 3), nn.Conv2d(2, 3, 3, padding=1, stride=2)
    tokens, images = torch.randn(2, 5, 6), torch.randn(2, 2, 6, 6)
    with RepresentationRecorder([("lin", lin), ("conv", conv)]) as rec:
        lin(tokens)
        conv(images)
    flat = tokens.reshape(10, 6).float()
    torch.testing.assert_close(rec.covariances["lin"], flat.T @ flat)
    patches = nn.functional.unfold(images, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18).float()
    torch.testing.assert_close(rec.covariances["conv"], patches.T @ patches)
    # im2col rows reproduce the convolution: they are what the (out x C·k·k) weight multiplies
    out = (patches.float() @ conv.weight.reshape(3, -1).T + conv.bias).reshape(2, 9, 3).transpose(1, 2)
    torch.testing.assert_close(out.reshape(2, 3, 3, 3), conv(images), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- correlation test / projection
def test_correlation_test_fires_on_constructed_cases():
    basis = torch.eye(5)[:, :2]  # old task's input subspace: e1, e2
    grad = torch.tensor([[1.0, 2.0, 0.1, 0.0, 0.0], [0.5, -1.0, 0.0, 0.2, 0.0]])
    assert correlation_test(grad, basis, grad.clone(), 0.5, 0.0).regime == REGIME_POSITIVE
    assert correlation_test(grad, basis, -grad, 0.5, 0.0).regime == REGIME_STRONG
    assert correlation_test(grad, basis, None, 0.5).regime == REGIME_STRONG  # TRGP: Definition 1 only
    orthogonal = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    weak = correlation_test(orthogonal, basis, grad, 0.5, 0.0)
    assert weak.regime == REGIME_WEAK and weak.projection_ratio == 0.0
    # epsilon_2 is a cosine threshold on the whole layer gradients (Definition 2)
    tilted = grad + torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    test = correlation_test(grad, basis, tilted, 0.5, 0.0)
    assert test.regime == REGIME_POSITIVE and test.cosine == pytest.approx(
        float((grad * tilted).sum() / (grad.norm() * tilted.norm())))
    assert correlation_test(grad, basis, tilted, 0.5, 0.9).regime == REGIME_STRONG
    # whole gradients anti-correlated outside S_j but aligned inside it: only the 'projection' option calls it positive
    outside = grad @ basis @ basis.T - 200 * (grad - grad @ basis @ basis.T)
    assert correlation_test(grad, basis, outside, 0.5, 0.0, on="gradient").regime == REGIME_STRONG
    assert correlation_test(grad, basis, outside, 0.5, 0.0, on="projection").regime == REGIME_POSITIVE
    # a zero stored gradient is not positively correlated
    assert correlation_test(grad, basis, torch.zeros_like(grad), 0.5, 0.0).regime == REGIME_STRONG


def test_trust_region_keeps_the_two_largest_projections():
    from hf_lowrank.cuber import Correlation, assign_regimes, trust_region

    tests = [Correlation(0.9, 0.5, REGIME_POSITIVE), Correlation(0.3, 0.5, REGIME_WEAK),
             Correlation(0.6, -0.2, REGIME_STRONG), Correlation(0.7, 0.1, REGIME_POSITIVE)]
    region = trust_region(tests, 2)
    assert region == [0, 3]  # task 2 is sufficient but third by projection: regime 1
    assert assign_regimes(tests, region, may_open=True) == [REGIME_POSITIVE, REGIME_WEAK, REGIME_WEAK, REGIME_POSITIVE]
    assert assign_regimes(tests, region, may_open=False) == [REGIME_STRONG, REGIME_WEAK, REGIME_WEAK, REGIME_STRONG]
    assert assign_regimes(tests, trust_region(tests, 3), True) == [3, 1, 2, 3]


def test_backward_update_keeps_regime3_subspace_and_protects_the_rest():
    eye = torch.eye(6)
    memory = LayerMemory(union=eye[:, :3], task_bases=[eye[:, :2], eye[:, 1:3]])
    grad = torch.ones(2, 6)
    # task 0 (e1, e2) is in regime 3, task 1 (e2, e3) is not: only e1 may move; e2 is shielded because task 1 uses it
    opened = LayerProjection(memory, open_tasks=[0])
    torch.testing.assert_close(opened.project(grad), torch.tensor([[1.0, 0, 0, 1, 1, 1]] * 2))
    assert (opened.open_dims, opened.allowed_dims) == (2, 1)
    assert (LayerProjection(memory).open_dims, LayerProjection(memory).allowed_dims) == (0, 0)
    torch.testing.assert_close(LayerProjection(memory, open_tasks=[0], backward_scale=0.5).project(grad),
                               torch.tensor([[0.5, 0, 0, 1, 1, 1]] * 2))
    # GPM: the whole union is removed
    torch.testing.assert_close(LayerProjection(memory).project(grad), torch.tensor([[0.0, 0, 0, 1, 1, 1]] * 2))


def test_penalty_gradient_is_the_gradient_of_eq3():
    from hf_lowrank.cuber import BackwardTransfer

    torch.manual_seed(0)
    layer = nn.Linear(6, 3, bias=False)
    start = layer.weight.detach().clone()
    bases = [torch.linalg.qr(torch.randn(6, 2))[0], torch.linalg.qr(torch.randn(6, 3))[0]]
    memory = LayerMemory(union=torch.zeros(6, 0), task_bases=bases, task_grads=[torch.randn(3, 6)] * 2)
    backward = BackwardTransfer({"lin": memory}, {"lin": [0, 1]}, {"lin": start}, penalty_lambda=0.7, epsilon_2=0.0)
    layer.weight.grad = torch.zeros_like(layer.weight)
    backward.add_penalty_grad_({"lin": layer})  # at W = W^{t-1} the penalty's (sub)gradient is zero
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))
    w = layer.weight.detach().double().requires_grad_(True)
    penalty = 0.7 * sum(((w - start.double()) @ b.double() @ b.double().T).norm() for b in bases)
    expected = torch.autograd.grad(penalty, w)[0]
    backward.add_penalty_grad_({"lin": layer})
    torch.testing.assert_close(layer.weight.grad.double(), expected, atol=1e-5, rtol=1e-5)
    assert float(backward.penalty({"lin": layer})) == pytest.approx(float(penalty.detach()), rel=1e-5)


def test_step_demotion_drops_a_failing_task_to_regime_2_for_the_rest_of_the_task():
    from hf_lowrank.cuber import BackwardTransfer, GradientProjection

    eye = torch.eye(4)
    stored = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    memory = LayerMemory(union=eye[:, :2], task_bases=[eye[:, :1], eye[:, 1:2]], task_grads=[stored, -stored])
    layer = nn.Linear(4, 1, bias=False)
    backward = BackwardTransfer({"lin": memory}, {"lin": [0, 1]}, {"lin": layer.weight.detach().clone()},
                                penalty_lambda=0.0, epsilon_2=0.0)
    projection = GradientProjection({"lin": layer}, {"lin": LayerProjection(memory, [0, 1])}, backward=backward,
                                    demote_every_step=True)
    layer.weight.grad = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # <g, g_0> > 0, <g, g_1> < 0
    projection.project_()
    assert backward.open_tasks == {"lin": [0]} and projection.demotions == [(0, "lin", 1)]
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[1.0, 0.0, 1.0, 1.0]]))  # e2 protected again
    layer.weight.grad = torch.tensor([[-1.0, 1.0, 1.0, 1.0]])  # now task 0 fails too
    projection.project_()
    assert backward.open_tasks == {} and projection.demotions == [(0, "lin", 1), (1, "lin", 0)]
    torch.testing.assert_close(layer.weight.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))


# ----------------------------------------------------------------------------- GPM invariance
@pytest.mark.parametrize("conv, optim, project_update", [(False, "sgd", False), (True, "sgd", False), (False, "adamw_torch", True)])
def test_gpm_keeps_old_task_outputs(tmp_path, conv, optim, project_update):
    torch.manual_seed(0)
    dim = 16 if conv else 24
    model = TinyNet(dim=dim, conv=conv)
    lr = 0.01 if optim.startswith("adam") else 0.05
    trainer = make_trainer(tmp_path, model, optim=optim, lr=lr, strategy="gpm", energy_threshold=1.0,
                           target_modules=["conv", "lin1", "lin2", "head"], project_update=project_update,
                           representation_samples=64)
    old, new = low_rank_task(0, dim=dim, rank=4), low_rank_task(1, dim=dim, rank=4)
    trainer.train_task("old", old, old)
    model.eval()
    with torch.no_grad():
        before = model(old.x)["logits"].clone()
        weights = {n: p.clone() for n, p in model.named_parameters()}
    trainer.train_task("new", new, new)
    model.eval()
    with torch.no_grad():
        after = model(old.x)["logits"]
    assert (after - before).abs().max() < 1e-4
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
    assert "lin1.weight" in moved and "head.weight" in moved  # the new task did learn
    assert not any(n.endswith("bias") for n in moved)  # biases frozen after the first task (GPM)


def test_finetune_forgets_where_gpm_does_not(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    trainer = make_trainer(tmp_path, model, strategy="finetune")
    old, new = low_rank_task(0), low_rank_task(1)
    trainer.train_task(0, old, old)
    with torch.no_grad():
        before = model(old.x)["logits"].clone()
    trainer.train_task(1, new, new)
    with torch.no_grad():
        assert (model(old.x)["logits"] - before).abs().max() > 1e-2
    assert trainer.memory.total_bytes() == 0


def test_cuber_records_correlations_and_reports_memory(tmp_path):
    torch.manual_seed(0)
    model = TinyNet(heads=3)
    trainer = make_trainer(tmp_path, model, strategy="cuber", head="multi", head_modules=["heads"],
                           energy_threshold=[0.9, 0.95], epochs=2)
    tasks = [low_rank_task(s) for s in range(3)]
    matrix = trainer.train_tasks([(t, t) for t in tasks])
    assert matrix.values.shape == (3, 3) and not np.isnan(np.tril(matrix.values)).any()
    # one test at the start of each task; each layer has one entry per old task
    assert [r["task_index"] for r in trainer.correlation_history] == [1, 2]
    assert [len(r["layers"]["lin1"]) for r in trainer.correlation_history] == [1, 2]
    counts = trainer.regime_counts()
    assert [sum(counts[t]["lin1"].values()) for t in range(2)] == [1, 2]
    nbytes = trainer.memory_bytes()
    assert set(nbytes) == {"lin1", "lin2"}  # heads are task-specific: neither projected nor remembered
    for name, parts in nbytes.items():
        layer = trainer.memory.layers[name]
        assert parts["union"] == layer.union.numel() * 4 > 0
        assert parts["task_bases"] == sum(b.numel() * 4 for b in layer.task_bases)
        weight = trainer.target_layers[name].weight
        assert parts["task_grads"] == 3 * weight.numel() * 4  # one whole layer gradient per task (Definition 2)
        assert [tuple(g.shape) for g in layer.task_grads] == [tuple(weight.shape)] * 3


def test_epoch_demotion_retests_from_the_second_epoch_of_every_later_task(tmp_path):
    """demotion="epoch": the first task (no old task) trains its epochs without a re-test; a later task re-tests
    once per epoch after its first (one record per test)."""
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, TinyNet(), strategy="cuber", energy_threshold=0.9, demotion="epoch", epochs=3)
    task = low_rank_task(0)
    trainer.train_task("first", task, task)
    assert trainer.correlation_history == []
    trainer.train_task("again", task, task)
    assert [record["task_index"] for record in trainer.correlation_history] == [1, 1, 1]


def test_backward_transfer_only_in_selected_layers(tmp_path):
    """Training the same data twice is positively correlated everywhere; only the selected layers may use it."""
    torch.manual_seed(0)
    model = TinyNet()
    trainer = make_trainer(tmp_path, model, strategy="cuber", energy_threshold=0.9, backward_transfer_modules=["lin1"],
                           freeze_unprojected_after_first_task=False, demotion="none")
    task = low_rank_task(0)
    trainer.train_task("first", task, task)
    head_before = model.head.weight.detach().clone()
    union = trainer.memory.layers["head"].union
    trainer.train_task("again", task, task)
    regimes = {name: [t["regime"] for t in tests] for name, tests in trainer.correlation_history[0]["layers"].items()}
    assert regimes == {"lin1": [REGIME_POSITIVE], "lin2": [REGIME_STRONG], "head": [REGIME_STRONG]}
    assert all(t["correlated"] for tests in trainer.correlation_history[0]["layers"].values() for t in tests)
    projections = trainer._projection.projections
    assert projections["lin1"].allowed is not None
    assert projections["lin2"].allowed is None and projections["head"].allowed is None
    # one old task, nothing to shield it from: all of its subspace stays open
    rank = trainer.memory.layers["lin1"].task_bases[0].shape[1]
    assert trainer.correlation_history[0]["subspaces"] == {"lin1": {"open": rank, "allowed": rank}}
    # the head was GPM-projected: its update has no component in the old task's subspace
    assert ((model.head.weight.detach() - head_before) @ union).abs().max() < 1e-5
    assert (model.head.weight.detach() - head_before).abs().max() > 1e-4
    with pytest.raises(ValueError, match="backward_transfer_modules"):
        make_trainer(tmp_path, TinyNet(), strategy="cuber", backward_transfer_modules=["decoder"])


def test_gradient_holdout_trains_on_the_rest_and_stores_the_held_out_gradient(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    trainer = make_trainer(tmp_path, model, strategy="cuber", energy_threshold=0.9, gradient_holdout=0.25)
    task = low_rank_task(0, n=40)
    trainer.train_task("first", task, task)
    assert len(trainer.train_dataset) == 30
    trained = {int(i) for i in trainer.train_dataset.indices}
    held_out = sorted(set(range(40)) - trained)
    assert len(held_out) == 10
    model.eval()  # the stored g_j is the mean-loss layer gradient on exactly the held-out examples
    loss = model(task.x[held_out], labels=task.y[held_out])["loss"]
    expected = torch.autograd.grad(loss, model.lin1.weight)[0]
    torch.testing.assert_close(trainer.memory.layers["lin1"].task_grads[0], expected, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- metrics
def test_acc_bwt_from_hand_made_matrix(tmp_path):
    rows = [[0.9], [0.8, 0.7], [0.85, 0.6, 0.95]]
    matrix = AccuracyMatrix(["a", "b"], rows[:2])
    matrix.add_row("c", rows[2])
    assert matrix.acc() == pytest.approx((0.85 + 0.6 + 0.95) / 3)
    assert matrix.bwt() == pytest.approx(((0.85 - 0.9) + (0.6 - 0.7)) / 2)
    assert average_accuracy(matrix.values) == pytest.approx(0.8)
    assert math.isnan(backward_transfer([[0.5]]))
    path = tmp_path / "r.json"
    matrix.save_json(str(path))
    loaded = AccuracyMatrix.load_json(str(path))
    assert loaded.task_ids == ["a", "b", "c"] and loaded.bwt() == pytest.approx(-0.075)
    matrix.plot(str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="expected 4"):
        matrix.add_row("d", [0.1])


# ----------------------------------------------------------------------------- checkpoint / resume
def test_resume_mid_sequence_reproduces_uninterrupted_run(tmp_path):
    tasks = [(f"t{s}", low_rank_task(s), low_rank_task(s)) for s in range(3)]
    config = dict(strategy="cuber", energy_threshold=0.95, save_state=True)

    torch.manual_seed(0)
    full = make_trainer(tmp_path / "full", TinyNet(), **config)
    full.train_tasks(tasks)

    torch.manual_seed(0)
    first = make_trainer(tmp_path / "part", TinyNet(), **config)
    first.train_tasks(tasks[:2])
    checkpoint = tmp_path / "part" / "task-1"
    state = torch.load(checkpoint / "continual_state.pt", weights_only=True)
    assert state["task_ids"] == ["t0", "t1"] and state["memory"]["num_tasks"] == 2

    torch.manual_seed(123)  # a differently initialised model: everything must come from the checkpoint
    resumed = make_trainer(tmp_path / "resumed", TinyNet(), **config)
    resumed.load_continual_checkpoint(str(checkpoint))
    for name, layer in resumed.memory.layers.items():
        torch.testing.assert_close(layer.union, first.memory.layers[name].union)
    resumed.train_tasks(tasks)
    np.testing.assert_allclose(resumed.accuracy.values, full.accuracy.values)
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, msg=name)


# ----------------------------------------------------------------------------- transformer linears
def test_transformer_linear_layers_use_token_rows(tmp_path):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(hidden=32, layers=1, intermediate=64, vocab=64, heads=2)

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, seed):
            self.ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(seed))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    trainer = make_trainer(tmp_path, model, strategy="gpm", energy_threshold=0.9, target_modules=["self_attn", "mlp"],
                           epochs=1)
    trainer.train_task(0, Tokens(0))
    ranks = trainer.memory.ranks()
    assert len(ranks) == 7  # q, k, v, o, gate, up, down
    assert ranks["model.layers.0.mlp.down_proj"][1] == 64 and ranks["model.layers.0.self_attn.q_proj"][1] == 32
    assert all(0 < r <= d for r, d in ranks.values())


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(energy_threshold=0.0), "energy_threshold"),
    (dict(energy_threshold=[0.9, 1.5]), "energy_threshold"),
    (dict(epsilon_1=0.0), "epsilon_1"),
    (dict(epsilon_1=1.2), "epsilon_1"),
    (dict(epsilon_2=-0.1), "epsilon_2"),
    (dict(strategy="ewc"), "strategy"),
    (dict(head="multi"), "head_modules"),
    (dict(strategy="gpm", forward_transfer=True), "forward_transfer"),
    (dict(trust_region_size=0), "trust_region_size"),
    (dict(scale_learning_rate=0.0), "scale_learning_rate"),
    (dict(strategy="gpm", backward_transfer_modules=["lin1"]), "backward_transfer_modules"),
    (dict(gradient_holdout=0.6), "gradient_holdout"),
    (dict(strategy="gpm", gradient_holdout=0.2), "gradient_holdout"),
    (dict(correlation_test="cosine"), "correlation_test"),
    (dict(demotion="always"), "demotion"),
    (dict(penalty_lambda=-1.0), "penalty_lambda"),
    (dict(strategy="trgp", penalty_lambda=2.0), "penalty_lambda` is a cuber option"),
    (dict(strategy="gpm", trust_region_size=1), "trust_region_size"),
    (dict(scale_update="adam"), "scale_update"),
    (dict(strategy="gpm", scale_update="preconditioned"), "scale_update` is a trgp/cuber option"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContinualConfig(**kwargs)


def test_config_rejects_string_backward_transfer_modules():
    with pytest.raises(TypeError, match="backward_transfer_modules"):
        ContinualConfig(backward_transfer_modules="lin1")


def test_trainer_rejects_bad_input(tmp_path):
    task = low_rank_task(0)
    trainer = make_trainer(tmp_path, TinyNet(), strategy="gpm")
    with pytest.raises(ValueError, match="empty"):
        trainer.train_task("a", Rows(task.x[:0], task.y[:0]))
    trainer.train_task("a", task)
    with pytest.raises(ValueError, match="already trained"):
        trainer.train_task("a", task)
    with pytest.raises(ValueError, match="None"):
        trainer.train_task(None, task)
    with pytest.raises(TypeError, match="not hashable"):
        trainer.train_task(["b"], task)
    numbered = make_trainer(tmp_path, TinyNet(), strategy="gpm")
    numbered.train_task(0, task)
    with pytest.raises(ValueError, match="collides with the earlier id 0"):
        numbered.train_task("0", task)
    two_heads = make_trainer(tmp_path, TinyNet(heads=2), strategy="gpm", head="multi", head_modules=["heads"])
    two_heads.train_tasks([task, task])
    with pytest.raises(ValueError, match="needs head 2.*matches 2 head"):
        two_heads.train_task("third", task)

    class WithEmbedding(TinyNet):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)

    with pytest.raises(ValueError, match="'embed' matches \\['Embedding'\\].*selects nothing"):
        make_trainer(tmp_path, WithEmbedding(), target_modules=["embed", "lin1"])
    grouped = TinyNet(conv=True)
    grouped.conv = nn.Conv2d(2, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        make_trainer(tmp_path, grouped, target_modules=["conv"])
    with pytest.raises(ValueError, match="3 target layers"):
        make_trainer(tmp_path, TinyNet(), energy_threshold=[0.9, 0.9]).train_task(0, task)

    class NoTaskArg(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.heads = nn.ModuleList([nn.Linear(2, 2)])

        def forward(self, x, labels=None):
            return {"logits": self.heads[0](self.lin(x))}

    with pytest.raises(ValueError, match="task_id"):
        make_trainer(tmp_path, NoTaskArg(), head="multi", head_modules=["heads"])
    opt = torch.optim.SGD(TinyNet().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        ContinualTrainer(model=TinyNet(), args=TrainingArguments(str(tmp_path), report_to=[], use_cpu=True),
                         optimizers=(opt, None))


def test_projection_strategies_refuse_several_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    for strategy in ("gpm", "trgp", "cuber"):
        with pytest.raises(ValueError, match=rf"strategy='{strategy}' runs in one process \(world_size is 2\)"):
            make_trainer(tmp_path, TinyNet(), strategy=strategy)
    make_trainer(tmp_path, TinyNet(), strategy="finetune")  # plain training: DDP syncs it as any Trainer run


# ----------------------------------------------------------------------------- TRGP forward transfer
def test_scaled_weight_projection_matches_effective_weight():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(6, 4)
    for name, module, x in [("conv", conv, torch.randn(2, 2, 5, 5)), ("lin", lin, torch.randn(5, 6))]:
        d = weight_matrix(module.weight).shape[1]
        basis = torch.linalg.qr(torch.randn(d, 3))[0]
        scale = torch.randn(3, 3)
        projection = ScaledWeightProjection({name: {0: (basis, scale)}})
        w = weight_matrix(module.weight)
        effective = (w - w @ basis @ basis.T + w @ basis @ scale @ basis.T).reshape(module.weight.shape)
        expected = (nn.functional.conv2d(x, effective, module.bias, padding=1) if name == "conv"
                    else nn.functional.linear(x, effective, module.bias))
        handles = projection.attach({name: module})
        torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=0)
        for h in handles:
            h.remove()
        identity = ScaledWeightProjection({name: {0: (basis, torch.eye(3))}})
        assert identity.weight_delta(name, module.weight).abs().max() < 1e-6


def test_preconditioned_scale_step_moves_the_effective_weight_at_most_one_weight_gradient():
    """With ``M = W B`` of norm 10, a plain unit step on Q moves ``W_eff`` by up to ``‖M‖² ‖G‖``; the preconditioned
    step ``(MᵀM + δI)⁻¹ ∇_Q`` moves it by ``P_M G B Bᵀ``, at most ``‖G‖``."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 5, bias=False)
    basis = torch.linalg.qr(torch.randn(6, 3))[0]
    with torch.no_grad():
        lin.weight.mul_(10 / (lin.weight @ basis).norm())
    x, target = torch.randn(8, 6), torch.randn(8, 5)
    steps = {}
    for preconditioned in (False, True):
        q = torch.eye(3).requires_grad_(True)
        projection = ScaledWeightProjection({"lin": {0: (basis, q)}}, preconditioned=preconditioned)
        handles = projection.attach({"lin": lin})
        (lin(x) * target).sum().backward()
        for h in handles:
            h.remove()
        steps[preconditioned] = (lin.weight @ basis @ -q.grad @ basis.T).detach()
    m = (lin.weight @ basis).detach()
    g = target.T @ x  # ∂L/∂W_eff
    plain = -m @ (m.T @ g @ basis) @ basis.T
    torch.testing.assert_close(steps[False], plain, rtol=1e-4, atol=1e-4)
    assert steps[False].norm() > 5 * g.norm()
    assert steps[True].norm() <= g.norm()
    projector = m @ torch.linalg.pinv(m)
    torch.testing.assert_close(steps[True], -projector @ g @ basis @ basis.T, rtol=1e-3, atol=1e-3)


def test_forward_transfer_trains_scales_keeps_old_task_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    # epsilon_1 tiny: every old task is in the trust region (TRGP: scales, no backward update)
    config = dict(strategy="trgp", energy_threshold=1.0, epsilon_1=0.01, representation_samples=64, save_state=True)
    trainer = make_trainer(tmp_path, model, **config)
    old, new = low_rank_task(0), low_rank_task(1)
    trainer.train_task("old", old, old)
    with torch.no_grad():
        before = model(old.x)["logits"].clone()
    trainer.train_task("new", new, new)
    with torch.no_grad():
        assert (model(old.x)["logits"] - before).abs().max() < 1e-4  # old task evaluated without the new scales
    scales = trainer.memory.layers["lin1"].task_scales
    assert scales[0] == {} and set(scales[1]) == {0}
    q = scales[1][0]
    assert q.shape == (trainer.memory.layers["lin1"].task_bases[0].shape[1],) * 2
    assert (q - torch.eye(q.shape[0])).abs().max() > 1e-4  # the scale was trained
    assert trainer.memory_bytes()["lin1"]["task_scales"] == q.numel() * 4
    # R[1, 1] is the new task's accuracy with its own scales applied
    stored = ScaledWeightProjection.from_memory(trainer.memory.layers, 1)
    handles = stored.attach(trainer.target_layers)
    with torch.no_grad():
        accuracy = float((model(new.x)["logits"].argmax(1) == new.y).float().mean())
    for h in handles:
        h.remove()
    assert trainer.accuracy.values[1, 1] == pytest.approx(accuracy)
    resumed = make_trainer(tmp_path / "resumed", TinyNet(), **config)
    resumed.load_continual_checkpoint(str(tmp_path / "task-1"))
    torch.testing.assert_close(resumed.memory.layers["lin1"].task_scales[1][0], q)


def test_scale_steps_use_only_their_own_gradient():
    """Two SGD steps on a loss whose gradient in Q is the constant G give Q = I - 2 lr G (with gradients adding up
    over steps, as when only the model's parameters were zeroed, it would be I - 3 lr G)."""
    basis = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)))[0]
    projection = ScaledWeightProjection({"lin": {0: (basis, torch.eye(3).requires_grad_(True))}})
    other = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([other], lr=1.0)
    handle = projection.attach_optimizer(optimizer, lr=0.1)
    assert optimizer.param_groups[-1]["lr"] == 0.1 and optimizer.param_groups[-1]["weight_decay"] == 0.0
    (q,) = projection.parameters()
    target = torch.arange(9.0).reshape(3, 3)
    for _ in range(2):
        (q * target).sum().backward()
        optimizer.step()
        assert q.grad is None
    torch.testing.assert_close(q.detach(), torch.eye(3) - 2 * 0.1 * target)
    handle.remove()
    (q * target).sum().backward()
    optimizer.step()
    assert q.grad is not None  # the hook is gone


@pytest.mark.parametrize("scale_lr", [None, 0.02])
def test_trainer_steps_scales_with_a_fresh_gradient_at_the_given_lr(tmp_path, scale_lr):
    """In the Trainer loop every step starts with no scale gradient and moves Q by -lr times that step's own
    gradient; the scales' lr is the model's unless `scale_learning_rate` is set."""
    from transformers import TrainerCallback

    torch.manual_seed(0)
    steps = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if trainer._scaled is not None:
                steps.append({"grad_at_begin": [q.grad for q in trainer._scaled.parameters()]})

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if trainer._scaled is not None:
                steps[-1].update(q=[q.detach().clone() for q in trainer._scaled.parameters()],
                                 grad=[q.grad.clone() for q in trainer._scaled.parameters()],
                                 lr=trainer.optimizer.param_groups[-1]["lr"])

        def on_optimizer_step(self, args, state, control, **kwargs):
            if trainer._scaled is not None:
                steps[-1]["after"] = [q.detach().clone() for q in trainer._scaled.parameters()]

    trainer = make_trainer(tmp_path, TinyNet(), lr=0.05, strategy="trgp", energy_threshold=1.0, epsilon_1=0.01,
                           representation_samples=64, scale_learning_rate=scale_lr)
    trainer.add_callback(Watch())
    trainer.train_task("old", low_rank_task(0), None)
    trainer.train_task("new", low_rank_task(1), None)
    assert len(steps) == 10  # 40 examples / batch 8, 2 epochs
    for step in steps:
        assert all(g is None for g in step["grad_at_begin"])
        assert step["lr"] == (scale_lr or 0.05)
        for before, grad, after in zip(step["q"], step["grad"], step["after"]):
            torch.testing.assert_close(after, before - step["lr"] * grad)
    assert any(float(g.abs().max()) > 0 for step in steps for g in step["grad"])


def load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cuber.py"
    spec = importlib.util.spec_from_file_location("cuber_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_merge_combines_per_run_files_and_adds_notes(tmp_path):
    bench = load_benchmark()
    runs = bench.OUT_DIR / "cuber_algorithm1_runs"
    files = [str(runs / "r8_pmnist10_gpm_5.json"), str(runs / "r8_pmnist10_gpm_6.json")]
    bench.main(["--merge", *files, "--out-dir", str(tmp_path), "--name", "merged", "--note", "Rows X predate fix Y."])
    report = (tmp_path / "merged.md").read_text()
    assert "| pmnist10 | gpm | 2 |" in report
    assert report.rstrip().endswith("Rows X predate fix Y.")
    assert json.loads((tmp_path / "merged.json").read_text())["notes"] == ["Rows X predate fix Y."]


def test_benchmark_validation_split_is_held_out_of_training_data():
    bench = load_benchmark()
    full = bench.make_sequence("graded", seed=3)
    held_out = bench.make_sequence("graded", seed=3, validation=True)
    for (task_id, train, test), (val_id, fit, val) in zip(full, held_out):
        assert task_id == val_id and len(fit) + len(val) == len(train)
        assert len(val) == pytest.approx(0.2 * len(train), abs=1)
        rows = lambda d: {tuple(r) for r in d.x.numpy().round(5).tolist()}  # noqa: E731
        assert rows(fit) | rows(val) == rows(train) and not rows(fit) & rows(val)
        assert not rows(val) & rows(test)  # the test split is never used for a choice
        assert set(val.y.tolist()) == set(range(10))  # stratified


def test_benchmark_permuted_mnist_from_the_shipped_test_set():
    bench = load_benchmark()
    x_train, x_test, y_train, y_test = bench.load_mnist_split()
    assert x_train.shape == (8000, 784) and x_test.shape == (2000, 784)
    np.testing.assert_array_equal(np.bincount(y_test), np.round(np.bincount(np.r_[y_train, y_test]) / 5).astype(int))
    tasks = bench.make_sequence("pmnist10", seed=0)
    assert len(tasks) == 10
    first_train, second_train = tasks[0][1], tasks[1][1]
    # the same images under another pixel permutation: equal sorted pixels, different layout
    torch.testing.assert_close(first_train.x.sort(1).values, second_train.x.sort(1).values)
    assert not torch.equal(first_train.x, second_train.x) and torch.equal(first_train.y, second_train.y)


def test_benchmark_graded_sequence_is_one_noise_family_of_decreasing_strength():
    bench = load_benchmark()
    graded = bench.make_sequence("graded", seed=0)
    clean_test = bench.make_sequence("correlated", seed=0)[0][2]
    assert len(graded) == 5
    gaps = [float(((test.x - clean_test.x) ** 2).mean()) for _, _, test in graded]
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    for _, train, test in graded:
        assert torch.equal(test.y, clean_test.y)
        assert set(train.y.tolist()) == set(range(10))


def test_benchmark_overlap_sequence_shares_classes_and_images_with_earlier_tasks():
    bench = load_benchmark()
    tasks = bench.make_sequence("overlap", seed=0)
    assert [len(np.unique(train.y.numpy())) for _, train, _ in tasks] == [4, 4, 2, 4, 4]
    assert bench.OVERLAPS == {0: set(), 1: {0}, 2: set(), 3: {2}, 4: {1, 3}}
    rows = lambda d, label: {tuple(r) for r in d.x[d.y == label].numpy().round(4).tolist()}  # noqa: E731
    # class 2 is label 2 of task 0 and label 0 of task 1: the same images
    assert rows(tasks[0][1], 2) == rows(tasks[1][1], 0)


def test_benchmark_selective_bwt_uses_the_old_task_with_most_regime3_layers():
    bench = load_benchmark()

    class Stub:
        correlation_history = [
            {"task_index": 1, "layers": {"lin1": [{"old_task": 0, "regime": 3}], "lin2": [{"old_task": 0, "regime": 1}]}},
            {"task_index": 2, "layers": {"lin1": [{"old_task": 0, "regime": 1}, {"old_task": 1, "regime": 2}]}},
        ]

    matrix = AccuracyMatrix(["a", "b", "c"], [[0.5], [0.6, 0.9], [0.6, 0.8, 0.9]])
    bwt_s, found, overlapping = bench.selective_bwt(matrix, Stub())
    assert (found, overlapping) == (1, 1) and bwt_s == pytest.approx(0.1)  # task 1 raised task 0 from 0.5 to 0.6


def test_task_basis_is_chosen_among_union_directions_by_the_task_energy():
    from hf_lowrank.cuber.memory import task_basis_from_union

    rep, _ = known_spectrum([8.0, 4.0, 2.0, 1.0], dim=8, seed=1)
    cov = (rep.T @ rep).float()
    union = extend_basis(torch.linalg.qr(torch.randn(8, 2, generator=torch.Generator().manual_seed(2)))[0], cov, 0.9)
    basis = task_basis_from_union(union, cov, 0.9)
    columns = {tuple(c.round(decimals=5).tolist()) for c in union.T}
    assert all(tuple(c.round(decimals=5).tolist()) in columns for c in basis.T)  # B_j is made of union columns
    energy = lambda b: float(torch.trace(b.T @ cov @ b))  # noqa: E731
    assert energy(basis) >= 0.9 * float(torch.trace(cov)) - 1e-4
    fewer = [basis[:, [i for i in range(basis.shape[1]) if i != k]] for k in range(basis.shape[1])]
    assert all(energy(b) < 0.9 * float(torch.trace(cov)) for b in fewer)  # and no column can be left out


def test_orthonormal_basis_survives_an_svd_that_fails_to_converge(monkeypatch):
    """Two task bases sharing union directions repeat singular values exactly; LAPACK's SVD can then fail to
    converge (seen on permuted MNIST). The Gram eigendecomposition gives the same span."""
    from hf_lowrank.cuber import projection

    union = torch.linalg.qr(torch.randn(20, 12, generator=torch.Generator().manual_seed(0)))[0]
    columns = torch.cat([union[:, :8], union[:, 4:12]], 1)  # 4 shared directions: the span is union's 12
    expected = projection._orthonormal(columns)

    def failing_svd(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", failing_svd)
    basis = projection._orthonormal(columns)
    assert basis.shape == expected.shape == (20, 12)
    torch.testing.assert_close(basis.T @ basis, torch.eye(12), atol=1e-5, rtol=0)
    torch.testing.assert_close(basis @ basis.T, expected @ expected.T, atol=1e-5, rtol=0)


def test_trainer_trains_the_scales_with_the_chosen_update_rule(tmp_path):
    """``scale_update`` reaches the scales of every new task; the preconditioned rule gives other scales."""
    from transformers import TrainerCallback

    finals = {}
    for rule in ("gradient", "preconditioned"):
        seen = []

        class Watch(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if trainer._scaled is not None and trainer._scaled.parameters():
                    seen.append(trainer._scaled.preconditioned)

        torch.manual_seed(0)
        trainer = make_trainer(tmp_path / rule, TinyNet(), strategy="trgp", energy_threshold=1.0, epsilon_1=0.01,
                               representation_samples=64, scale_update=rule)
        trainer.add_callback(Watch())
        trainer.train_task("old", low_rank_task(0), None)
        trainer.train_task("new", low_rank_task(1), None)
        assert seen and set(seen) == {rule == "preconditioned"}
        finals[rule] = trainer.memory.layers["lin1"].task_scales[1][0]
    assert not torch.allclose(finals["gradient"], finals["preconditioned"])
