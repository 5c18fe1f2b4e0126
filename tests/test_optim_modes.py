"""Every registered mode trains; each part of the design (8-bit state, DCT indices, FRUGAL residual, moment
policies, Adafactor) does what it claims, checked against an oracle or by hand."""
import copy
import warnings

import pytest
import torch

from hf_lowrank.optim import ModeSpec, ProjectedOptimizer, available_modes, create_optimizer, get_mode, register_mode
from tests.conftest import make_tiny_llama, prepare_for_mode


def batches(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (4, 16), generator=generator) for _ in range(n)]


def train(model, optimizer, data):
    losses = []
    for ids in data:
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def mode_kwargs(mode):
    kwargs = {"update_proj_gap": 2, "lr": 1e-2}
    if get_mode(mode).projector is not None and "density" not in get_mode(mode).defaults:
        kwargs["rank"] = 8
    if get_mode(mode).inner == "adamw8bit":
        kwargs["min_8bit_size"] = 256  # make the tiny model's low-rank moments 8-bit too
    return kwargs


@pytest.mark.parametrize("mode", available_modes())
def test_every_mode_trains(mode):
    model = prepare_for_mode(make_tiny_llama(), mode)
    optimizer = create_optimizer(model, mode, **mode_kwargs(mode))
    data = batches(1) * 6  # one batch seen repeatedly: its loss must fall
    losses = train(model, optimizer, data)
    assert losses[-1] < 0.9 * losses[0], losses


def test_required_modes_are_registered():
    required = {"adamw", "galore", "galore_8bit", "galore_adafactor", "galore_randomized", "galore_dct", "frugal"}
    assert required <= set(available_modes())
    assert available_modes() == sorted(available_modes())


def projected_states(optimizer):
    group = next(g for g in optimizer.param_groups if "rank" in g)
    return [optimizer.state[p] for p in group["params"]], group


def test_galore_8bit_state_is_uint8():
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore_8bit", rank=8, min_8bit_size=256)
    train(model, optimizer, batches(2))
    states, _ = projected_states(optimizer)
    for state in states:
        assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_sq"].dtype == torch.uint8
        assert state["exp_avg_absmax"].dtype == torch.float32
        assert state["exp_avg_absmax"].numel() == -(-state["exp_avg"].numel() // 256)
    # large plain tensors (embeddings) are 8-bit too; tiny ones (norms) keep fp32 moments, as bitsandbytes does
    embed = optimizer.state[model.model.embed_tokens.weight]
    norm = optimizer.state[model.model.norm.weight]
    assert embed["exp_avg"].dtype == torch.uint8 and norm["exp_avg"].dtype == torch.float32


def test_8bit_matches_bitsandbytes_adam8bit():
    """Our dequantize -> AdamW -> requantize step equals bitsandbytes' own 8-bit Adam (the oracle)."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    start = torch.randn(128, 64)
    grads = [torch.randn(128, 64) * (1 + torch.arange(64)) for _ in range(5)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizers = [ProjectedOptimizer([ours], lr=1e-3, inner="adamw8bit", min_8bit_size=0),
                  bnb.optim.Adam8bit([theirs], lr=1e-3, eps=1e-8, min_8bit_size=0)]
    for grad in grads:
        for weight, optimizer in zip((ours, theirs), optimizers):
            weight.grad = grad.clone()
            optimizer.step()
    assert ((ours - theirs).norm() / (theirs - start).norm()).item() < 1e-5
    assert optimizers[0].state[ours]["exp_avg"].dtype == torch.uint8


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_slice_quantizer_gives_bitsandbytes_cpu_codes_bit_for_bit(signed):
    """The torch-op quantizer of the sliced 8-bit path returns exactly the codes and absmax of bitsandbytes' CPU
    kernel: every magnitude from 1e-9 to 1e3, an all-zero block, values at +-absmax, a partial last block."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    from hf_lowrank.optim.inner import AdamW8bit

    inner = AdamW8bit()
    code, lut = inner._code(signed, torch.device("cpu")), inner._lut(signed, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.empty(4096, 1).uniform_(-9, 3, generator=generator)
    values = torch.randn(4096, 256, generator=generator) * scales
    values[7] = 0.0
    values = values.abs() if not signed else values
    values = values.reshape(-1)[:-100]  # the last block has 156 values
    got_codes, got_absmax = inner._quantize_slice(values.clone(), lut)
    want_codes, want_absmax = torch.ops.bitsandbytes.quantize_blockwise(values, code, 256)
    assert torch.equal(got_absmax, want_absmax)
    assert torch.equal(got_codes, want_codes)


@pytest.mark.parametrize("slice_kernel", ["fused", "foreach"])
@pytest.mark.parametrize("low_rank", [False, True])
def test_8bit_slices_equal_one_fused_update(monkeypatch, low_rank, slice_kernel):
    """Off bitsandbytes' fused devices the 8-bit update runs slice by slice (several slices, a partial last block
    here), each slice through torch's fused AdamW or, where a device lacks it, the foreach ops; the result equals
    one bitsandbytes update of the whole tensor, and a non-finite step keeps the codes."""
    from hf_lowrank.optim.inner import AdamW8bit

    if slice_kernel == "foreach":
        monkeypatch.setattr(AdamW8bit, "fused_devices", ())
    torch.manual_seed(0)
    start = torch.randn(96, 70)  # 6720 values: 26.25 blocks, 3.3 slices of 2048
    grads = [torch.randn(96, 70) * (1 + torch.arange(70)) for _ in range(4)]
    grads.insert(2, torch.full((96, 70), float("nan")))
    results = []
    for fused_devices in (("cpu",), ()):
        monkeypatch.setattr(AdamW8bit, "fused_update_devices", fused_devices)
        monkeypatch.setattr(AdamW8bit, "SLICE_SIZE", 2048)
        weight = torch.nn.Parameter(start.clone())
        options = dict(rank=8, update_proj_gap=100) if low_rank else {}
        optimizer = ProjectedOptimizer([{"params": [weight], **options}], lr=1e-3, inner="adamw8bit",
                                       min_8bit_size=0)
        codes = []
        for grad in grads:
            weight.grad = grad.clone()
            optimizer.step()
            codes.append(optimizer.state[weight]["exp_avg"].clone())
        assert torch.equal(codes[2], codes[1])  # the NaN step left the moments as they were
        results.append((weight.detach().clone(), codes[-1], optimizer.state[weight]["exp_avg_sq_absmax"].clone()))
    (fused_weight, fused_codes, fused_absmax), (sliced_weight, sliced_codes, sliced_absmax) = results
    # Same math, different fp32 operation order (bitsandbytes' C kernel vs torch's fused AdamW on slices), so an
    # occasional code lands one step apart; how often depends on the CPU's vector width (3.6e-6 seen without AVX-512).
    assert ((sliced_weight - fused_weight).norm() / (fused_weight - start).norm()).item() < 1e-5
    assert (sliced_codes.int() - fused_codes.int()).abs().max().item() <= 1
    torch.testing.assert_close(sliced_absmax, fused_absmax, rtol=1e-6, atol=0)


def test_8bit_sliced_update_of_bf16_weights():
    """bf16 weights with 8-bit moments: the slice is stepped in fp32 and written back in the weight's dtype."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 1100, dtype=torch.bfloat16))
    start = weight.detach().clone()
    optimizer = ProjectedOptimizer([weight], lr=1e-2, inner="adamw8bit", min_8bit_size=0)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert weight.dtype == torch.bfloat16
    moved = (weight.detach().float() - start.float()).abs()
    assert moved.median().item() == pytest.approx(1e-2, rel=0.2)  # Adam's first step moves each weight by ~lr


@pytest.mark.parametrize("mode", ["galore", "galore_8bit", "frugal"])
def test_step_in_chunks_equals_one_chunk(monkeypatch, mode):
    """step() bounds its temporaries by stepping a group a chunk of parameters at a time; the update is the same."""
    results = []
    for chunk_numel in (ProjectedOptimizer.step_chunk_numel, 5000):
        monkeypatch.setattr(ProjectedOptimizer, "step_chunk_numel", chunk_numel)
        torch.manual_seed(0)
        model = make_tiny_llama()
        train(model, create_optimizer(model, mode, **mode_kwargs(mode)), batches(3))
        results.append([p.detach().clone() for p in model.parameters()])
    for chunked, whole in zip(*results):
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)


def test_chunks_are_bounded_runs():
    from hf_lowrank.optim.optimizer import _chunks

    params = [torch.empty(n) for n in (3, 4, 10, 2, 2, 1)]
    assert _chunks(params, 7) == [[0, 1], [2], [3, 4, 5]]
    assert _chunks(params, 100) == [[0, 1, 2, 3, 4, 5]]


def test_galore_dct_stores_only_indices():
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore_dct", rank=8)
    train(model, optimizer, batches(1))
    states, _ = projected_states(optimizer)
    for state in states:
        assert set(state["projector"]) == {"indices"}
        assert state["projector"]["indices"].dtype == torch.int32 and state["projector"]["indices"].numel() == 8


def complement_norm(delta, basis, side):
    """Norm of the part of ``delta`` outside the subspace spanned by ``basis`` on ``side``."""
    inside = basis @ (basis.T @ delta) if side == "left" else (delta @ basis) @ basis.T
    return (delta - inside).norm() / delta.norm()


@pytest.mark.parametrize("mode, outside", [("galore", False), ("frugal", True)])
def test_frugal_residual_updates_out_of_subspace_directions(mode, outside):
    model = make_tiny_llama()
    optimizer = create_optimizer(model, mode, rank=8)
    before = {p: p.detach().clone() for p in model.parameters()}
    train(model, optimizer, batches(1))
    group = next(g for g in optimizer.param_groups if "rank" in g)
    for p in group["params"]:
        projector = optimizer._projectors[p]
        fraction = complement_norm(p.detach() - before[p], projector.basis(), projector.side)
        assert (fraction > 0.5) if outside else (fraction < 1e-4)


def test_frugal_density_sets_rank():
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "frugal", density=0.25)
    train(model, optimizer, batches(1))
    group = next(g for g in optimizer.param_groups if "rank" in g)
    assert group["rank"] is None and group["density"] == 0.25
    for p in group["params"]:
        projector = optimizer._projectors[p]
        assert projector.rank == round(0.25 * projector.dim)
    explicit = create_optimizer(make_tiny_llama(), "frugal", rank=4)
    assert next(g for g in explicit.param_groups if "rank" in g)["rank"] == 4


def single_matrix_run(policy, shape, steps=3, **options):
    """One projected matrix, gap 2; returns (moments and basis before the refresh at step 2, optimizer, grads)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(shape))
    optimizer = ProjectedOptimizer([{"params": [weight], "rank": 3, "update_proj_gap": 2, "scale": 1.0,
                                     "moment_policy": policy, "projector_options": options}], lr=0.1)
    grads = [torch.randn(shape) for _ in range(steps)]
    snapshot = None
    for i, grad in enumerate(grads):
        if i == 2:
            state = optimizer.state[weight]
            snapshot = (state["exp_avg"].clone(), state["exp_avg_sq"].clone(),
                        optimizer._projectors[weight].basis().clone(), state["moment_step"])
        weight.grad = grad
        optimizer.step()
    return snapshot, optimizer, weight, grads


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])  # left and right projections
@pytest.mark.parametrize("policy", ["keep", "reset", "rotate"])
def test_moment_policies_at_refresh(policy, shape):
    (m, v, previous_basis, moment_step), optimizer, weight, grads = single_matrix_run(policy, shape)
    state, projector = optimizer.state[weight], optimizer._projectors[weight]
    basis, low = projector.basis(), projector.project(grads[2])
    beta1, beta2 = 0.9, 0.999
    if policy == "reset":
        m, v = torch.zeros_like(m), torch.zeros_like(v)
        assert state["moment_step"] == 1
    elif policy == "rotate":
        rotation = basis.T @ previous_basis
        if projector.side == "left":
            m, v = rotation @ m, rotation.square() @ v
        else:
            m, v = m @ rotation.T, v @ rotation.square().T
    if policy != "reset":
        assert state["moment_step"] == moment_step + 1
    torch.testing.assert_close(state["exp_avg"], beta1 * m + (1 - beta1) * low)
    torch.testing.assert_close(state["exp_avg_sq"], beta2 * v + (1 - beta2) * low.square())


def test_rotate_is_identity_when_the_subspace_does_not_change():
    """Same gradient at every step and aligned signs: rotate == keep exactly (R = I), even if LAPACK flips signs."""
    torch.manual_seed(0)
    grad = torch.randn(8, 12)
    results = {}
    for policy in ("keep", "rotate"):
        weight = torch.nn.Parameter(torch.zeros(8, 12))
        optimizer = ProjectedOptimizer([{"params": [weight], "rank": 4, "update_proj_gap": 2,
                                         "moment_policy": policy, "projector_options": {"sign_convention": "align"}}])
        for _ in range(5):
            weight.grad = grad.clone()
            optimizer.step()
        results[policy] = weight.detach().clone()
    torch.testing.assert_close(results["keep"], results["rotate"])


def test_rotate_with_8bit_state():
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore_8bit", rank=8, update_proj_gap=2, moment_policy="rotate",
                                 sign_convention="align", min_8bit_size=256)
    losses = train(model, optimizer, batches(1) * 5)
    assert losses[-1] < losses[0]
    states, _ = projected_states(optimizer)
    assert all(s["exp_avg"].dtype == torch.uint8 for s in states)


def test_adafactor_matches_transformers_and_galore_torch():
    from galore_torch import GaLoreAdafactor
    from transformers.optimization import Adafactor

    base = make_tiny_llama()
    models = [copy.deepcopy(base) for _ in range(4)]
    projected = lambda m: [p for n, p in m.named_parameters() if ("attn" in n or "mlp" in n)]  # noqa: E731
    groups = lambda m: [  # noqa: E731
        {"params": [p for p in m.parameters() if all(p is not q for q in projected(m))]},
        {"params": projected(m), "rank": 8, "update_proj_gap": 2, "scale": 0.25, "proj_type": "std"},
    ]
    hf = dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizers = [
            ProjectedOptimizer(models[0].parameters(), lr=1e-2, inner="adafactor"),
            Adafactor(models[1].parameters(), **hf),
            ProjectedOptimizer(groups(models[2]), lr=1e-2, inner="adafactor"),
            GaLoreAdafactor(groups(models[3]), **hf),
        ]
    for ids in batches(5):
        base.load_state_dict(models[0].state_dict())
        base.zero_grad()
        base(input_ids=ids, labels=ids).loss.backward()
        plain_grads = [p.grad.clone() for p in base.parameters()]
        for model, optimizer in zip(models[:2], optimizers[:2]):
            for p, g in zip(model.parameters(), plain_grads):
                p.grad = g.clone()
            optimizer.step()
        base.load_state_dict(models[2].state_dict())
        base.zero_grad()
        base(input_ids=ids, labels=ids).loss.backward()
        galore_grads = [p.grad.clone() for p in base.parameters()]
        for model, optimizer in zip(models[2:], optimizers[2:]):
            for p, g in zip(model.parameters(), galore_grads):
                p.grad = g.clone()
            optimizer.step()
    for ours, theirs in ((models[0], models[1]), (models[2], models[3])):
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert ((p - q).norm() / q.norm()).item() < 1e-5, name


def test_register_mode_adds_a_combination():
    name = "test_galore_randomized_reset"
    register_mode(name, ModeSpec("randomized", moment_policy="reset", defaults={"rank": 4}), overwrite=True)
    assert name in available_modes()
    model = make_tiny_llama()
    optimizer = create_optimizer(model, name, update_proj_gap=2, lr=1e-2)
    group = next(g for g in optimizer.param_groups if "rank" in g)
    assert (group["projector"], group["moment_policy"], group["rank"]) == ("randomized", "reset", 4)
    with pytest.raises(ValueError, match="already registered"):
        register_mode(name, ModeSpec("svd"))


def test_plain_group_holds_everything_not_targeted():
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore", target_modules=["q_proj", "v_proj"], rank=4)
    plain, projected = optimizer.param_groups
    assert "rank" not in plain and projected["rank"] == 4
    assert sorted(projected["param_names"]) == sorted(
        n for n, _ in model.named_parameters() if n.endswith(("q_proj.weight", "v_proj.weight")))
    assert len(plain["params"]) + len(projected["params"]) == len(list(model.parameters()))
    model.model.embed_tokens.weight.requires_grad_(False)
    frozen = create_optimizer(model, "galore", rank=4)
    assert all(p is not model.model.embed_tokens.weight for g in frozen.param_groups for p in g["params"])


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
@pytest.mark.parametrize("rank", [3, 8])  # 8 >= min(shape): full-rank subspace, square low-rank moments
def test_proj_types_on_square_tall_and_wide_matrices(proj_type, rank):
    """galore-torch breaks on square `reverse_std`; here every side rule works, also with rank >= the side's dim."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(shape)) for shape in ((8, 8), (12, 8), (8, 12))]
    optimizer = ProjectedOptimizer([{"params": weights, "rank": rank, "proj_type": proj_type, "scale": 1.0}], lr=0.1)
    targets = [torch.randn(w.shape) for w in weights]
    start = sum(((w - t) ** 2).sum().item() for w, t in zip(weights, targets))
    for _ in range(5):
        for w, t in zip(weights, targets):
            w.grad = 2 * (w.detach() - t)
        optimizer.step()
    assert sum(((w - t) ** 2).sum().item() for w, t in zip(weights, targets)) < start
    for w in weights:  # rank is clamped to the projected side; moments have the low-rank shape of that side
        projector = optimizer._projectors[w]
        assert projector.rank == min(rank, projector.dim)
        low_shape = (projector.rank, w.shape[1]) if projector.side == "left" else (w.shape[0], projector.rank)
        assert optimizer.state[w]["exp_avg"].shape == low_shape


def test_bf16_model_trains_with_bf16_state():
    model = make_tiny_llama().to(torch.bfloat16)
    optimizer = create_optimizer(model, "galore", rank=8, update_proj_gap=2, lr=1e-2)
    losses = train(model, optimizer, batches(1) * 5)
    assert losses[-1] < losses[0]
    states, _ = projected_states(optimizer)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in states)
