"""Layer-wise updates (hf_lowrank.optim.layerwise): same result as a normal step, less gradient memory."""
import copy
import io

import pytest
import torch
from accelerate.state import GradientState
from torch.utils._python_dispatch import TorchDispatchMode

from hf_lowrank.optim import ProjectedOptimizer, available_modes, create_optimizer, get_mode
from hf_lowrank.optim.layerwise import LayerwiseOptimizer, make_layerwise, remove_layerwise_hooks
from tests.conftest import make_tiny_llama, prepare_for_mode


GAP = 2  # refresh projectors often so the comparisons cross several refreshes


def make_optimizer(model, mode="galore"):
    options = {"lr": 1e-2, "weight_decay": 0.1}
    if get_mode(mode).projector is not None:
        options["update_proj_gap"] = GAP
        if "density" not in get_mode(mode).defaults:
            options["rank"] = 8
    if get_mode(mode).inner == "adamw8bit":
        options["min_8bit_size"] = 256
    return create_optimizer(model, mode, **options)


def batches(count, seed=0, batch=2, seq=16, vocab=256):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=generator) for _ in range(count)]


def backward(model, ids, scale=1.0):
    (model(input_ids=ids, labels=ids).loss * scale).backward()


def warmup_schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (step + 1) / 4)


@pytest.fixture
def models():
    reference = make_tiny_llama()
    layerwise = copy.deepcopy(reference)
    yield reference, layerwise


@pytest.fixture(autouse=True)
def restore_sync_gradients():
    yield
    GradientState()._set_sync_gradients(True)


def assert_same_parameters(model_a, model_b, rtol=1e-6, atol=1e-7):
    """Parameters and buffers (quantized weights live in buffers)."""
    state_b = model_b.state_dict()
    for name, a in model_a.state_dict().items():
        torch.testing.assert_close(a, state_b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def train_reference(model, data, accumulation, mode="galore"):
    optimizer = make_optimizer(model, mode)
    scheduler = warmup_schedule(optimizer)
    for start in range(0, len(data), accumulation):
        for ids in data[start : start + accumulation]:
            backward(model, ids, 1 / accumulation)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return optimizer


def train_layerwise(model, data, accumulation, mode="galore"):
    """The same loop as :func:`train_reference`, stepping inside backward; detaches the hooks at the end."""
    optimizer = make_layerwise(make_optimizer(model, mode), model, gradient_accumulation_steps=accumulation)
    scheduler = warmup_schedule(optimizer)
    for start in range(0, len(data), accumulation):
        for ids in data[start : start + accumulation]:
            backward(model, ids, 1 / accumulation)
        optimizer.step()
        scheduler.step()
    optimizer.remove_hooks()


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("mode", available_modes())
def test_layerwise_matches_normal_step(models, mode, accumulation):
    reference, model = (prepare_for_mode(m, mode) for m in models)
    data = batches(3 * GAP * accumulation)
    train_reference(reference, data, accumulation, mode)
    train_layerwise(model, data, accumulation, mode)
    assert_same_parameters(reference, model)
    assert all(p.grad is None for p in model.parameters())


def test_accumulation_follows_accelerate_sync_gradients(models):
    """Without a counter, the wrapper steps exactly when Trainer/accelerate mark the last micro-batch."""
    reference, model = models
    data = batches(4)
    train_reference(reference, data, 2)

    optimizer = make_layerwise(make_optimizer(model), model)
    scheduler = warmup_schedule(optimizer)
    for index, ids in enumerate(data):
        last = index % 2 == 1
        GradientState()._set_sync_gradients(last)  # what Trainer does before each micro-batch
        backward(model, ids, 0.5)
        if not last:  # the first micro-batch only accumulated
            assert all(p.grad is not None for p in model.parameters())
        else:
            optimizer.step()
            scheduler.step()
    optimizer.remove_hooks()
    assert_same_parameters(reference, model)


def test_at_most_one_full_gradient_alive(models):
    _, model = models
    inner = make_optimizer(model)
    alive = []
    step_parameter = inner.step_parameter

    def counting_step_parameter(p, group):
        alive.append(sum(q.grad is not None for q in model.parameters()))
        step_parameter(p, group)

    inner.step_parameter = counting_step_parameter
    optimizer = make_layerwise(inner, model)
    for ids in batches(2):
        backward(model, ids)
    optimizer.remove_hooks()
    assert len(alive) == 2 * len(list(model.parameters()))
    assert max(alive) == 1


@pytest.mark.parametrize("accumulation", [1, 2])
def test_true_grad_norm_matches_clip_grad_norm(models, accumulation):
    reference, model = models
    data = batches(accumulation, seed=3)
    for ids in data:
        backward(reference, ids, 1 / accumulation)
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf")).item()

    optimizer = make_layerwise(make_optimizer(model), model, gradient_accumulation_steps=accumulation)
    assert optimizer.last_grad_norm is None
    for ids in data:
        backward(model, ids, 1 / accumulation)
    optimizer.remove_hooks()
    assert optimizer.last_grad_norm == pytest.approx(expected, rel=1e-5)
    assert expected > 0


def test_grad_norm_of_a_step_that_misses_parameters_is_closed_by_step(models):
    """A parameter without gradient this step (unused) leaves the record open until step() closes it."""
    _, model = models
    embeddings, head = model.model.embed_tokens.weight, model.lm_head.weight
    optimizer = make_layerwise(ProjectedOptimizer([embeddings, head]), model)
    ids = batches(1)[0]
    expected = torch.autograd.grad(embeddings[ids].pow(2).sum(), embeddings)[0].norm().item()
    embeddings[ids].pow(2).sum().backward()  # lm_head gets no gradient
    assert optimizer.last_grad_norm is None
    optimizer.step()
    optimizer.remove_hooks()
    assert optimizer.last_grad_norm == pytest.approx(expected, rel=1e-6)


def test_scheduler_drives_the_learning_rate_used_in_hooks(models):
    _, model = models
    optimizer = make_layerwise(make_optimizer(model), model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0 if step == 1 else 1.0)
    data = batches(2)
    backward(model, data[0])
    optimizer.step()
    scheduler.step()  # lr is 0 for the second step: the hooks must not move any weight
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, data[1])
    optimizer.remove_hooks()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert [g["lr"] for g in optimizer.optimizer.param_groups] == [0.0, 0.0]


def test_scheduler_still_drives_the_hooks_after_load_state_dict(models):
    """load_state_dict replaces the inner optimizer's group dicts; the wrapper must follow them."""
    _, model = models
    optimizer = make_layerwise(make_optimizer(model), model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** (step + 1))
    optimizer.load_state_dict(optimizer.state_dict())
    optimizer.step()
    scheduler.step()
    optimizer.remove_hooks()
    assert [g["lr"] for g in optimizer.optimizer.param_groups] == [1e-2 * 0.25] * 2


def test_state_dict_round_trip_weights_only_and_resume(models):
    reference, model = models
    data = batches(5)
    optimizer = make_layerwise(make_optimizer(reference), reference)
    for ids in data[:3]:
        backward(reference, ids)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    model.load_state_dict(reference.state_dict())
    for ids in data[3:]:
        backward(reference, ids)
    optimizer.remove_hooks()

    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = make_layerwise(make_optimizer(model), model)
    resumed.load_state_dict(state)
    for ids in data[3:]:
        backward(model, ids)
    resumed.remove_hooks()
    assert resumed.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    assert_same_parameters(reference, model, rtol=0, atol=0)


def test_multi_process_without_ddp_or_fsdp2_is_refused_at_the_first_backward(models, monkeypatch):
    _, model = models
    optimizer = make_layerwise(make_optimizer(model), model)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)
    try:
        with pytest.raises(RuntimeError, match="neither in a DDP-wrapped model nor an FSDP2 shard"):
            backward(model, batches(1)[0])
    finally:
        optimizer.remove_hooks()


def test_an_optimizer_that_skips_whole_steps_is_refused(models):
    _, model = models
    with pytest.raises(ValueError, match="nonfinite='skip_step'.*'skip_param'"):
        make_layerwise(create_optimizer(model, "galore", rank=8, nonfinite="skip_step"), model)


def test_remove_hooks_leaves_gradients_alone(models):
    _, model = models
    optimizer = make_layerwise(make_optimizer(model), model)
    optimizer.remove_hooks()
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, batches(1)[0])
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_bad_input_gets_clear_errors(models):
    _, model = models
    with pytest.raises(TypeError, match="step_parameter"):
        make_layerwise(torch.optim.AdamW(model.parameters()), model)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        make_layerwise(make_optimizer(model), model, gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="not in `model`"):
        make_layerwise(ProjectedOptimizer([torch.nn.Parameter(torch.zeros(3))]), model)


def test_one_layerwise_optimizer_per_model(models):
    """A second wrapper would step every parameter twice: refused until the first one is detached."""
    _, model = models
    first = make_layerwise(make_optimizer(model), model)
    with pytest.raises(ValueError, match="remove_hooks"):
        make_layerwise(make_optimizer(model), model)
    remove_layerwise_hooks(model)
    assert not first._hooks
    second = make_layerwise(make_optimizer(model), model)
    assert isinstance(second, LayerwiseOptimizer)
    second.remove_hooks()


def test_add_param_group_hooks_the_new_parameters(models):
    _, model = models
    head = model.lm_head.weight
    optimizer = make_layerwise(ProjectedOptimizer([p for p in model.parameters() if p is not head], lr=1e-2), model)
    optimizer.add_param_group({"params": [head]})
    before = head.detach().clone()
    backward(model, batches(1)[0])
    optimizer.remove_hooks()
    assert head.grad is None and not torch.equal(before, head)


def test_gradient_checkpointing_steps_each_parameter_once(models):
    """Reentrant checkpointing re-runs backward per layer: each parameter must still be stepped exactly once."""
    reference, model = models
    for m in (reference, model):
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        m.train()
    data = batches(2 * GAP)
    train_reference(reference, data, 1)
    optimizer = make_layerwise(make_optimizer(model), model)
    calls = []
    step_parameter = optimizer.optimizer.step_parameter
    optimizer.optimizer.step_parameter = lambda p, group: (calls.append(p), step_parameter(p, group))
    scheduler = warmup_schedule(optimizer)
    for ids in data:
        backward(model, ids)
        optimizer.step()
        scheduler.step()
    optimizer.remove_hooks()
    assert len(calls) == len(data) * len(list(model.parameters()))
    assert_same_parameters(reference, model)


def test_parameters_unfrozen_after_construction_are_stepped_layerwise():
    """Layer-sampling methods (OwLore, LISA) unfreeze blocks after the optimizer is built."""
    model = make_tiny_llama()
    optimizer = make_layerwise(make_optimizer(model), model)
    late = model.model.layers[1].mlp.up_proj.weight
    try:
        late.requires_grad_(False)
        backward(model, batches(1)[0])
        before = late.detach().clone()
        late.requires_grad_(True)  # unfrozen after the optimizer (and its hooks) exist
        backward(model, batches(1, seed=1)[0])
        assert not torch.equal(late, before) and late.grad is None  # stepped inside backward and freed
        assert optimizer.last_grad_norm is not None
    finally:
        optimizer.remove_hooks()


def test_release_state_frees_a_parameter_and_it_restarts_fresh():
    from hf_lowrank.optim import optimizer_state_bytes

    model = make_tiny_llama()
    optimizer = make_optimizer(model)
    data = batches(3)
    for ids in data[:2]:
        backward(model, ids)
        optimizer.step()
        optimizer.zero_grad()
    block = [p for p in model.model.layers[0].parameters()]
    total = optimizer_state_bytes(optimizer)
    freed = optimizer.release_state(block)
    assert freed > 0 and optimizer_state_bytes(optimizer) == total - freed
    assert all(p not in optimizer.state for p in block)
    backward(model, data[2])
    optimizer.step()  # reactivated: fresh moments and a refitted projector
    weight = model.model.layers[0].mlp.up_proj.weight
    assert optimizer.state[weight]["moment_step"] == 1 and optimizer.state[weight]["projector"]


def tied_llama(mode="galore"):
    model = make_tiny_llama(tie_word_embeddings=True)
    model.model.embed_tokens.padding_idx = 0  # as F.embedding: the padding row gets no lookup gradient
    return prepare_for_mode(model, mode)


def tied_batches(count):
    data = batches(count)
    for ids in data:
        ids[0, :3] = 0  # padding tokens
    return data


class FullSizeTensors(TorchDispatchMode):
    """Counts the new (not in-place, not view) tensors of one shape that ops create while ``active``."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.active, self.created = tuple(shape), True, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if (self.active and isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape
                and not name.endswith("_") and not func.is_view):
            self.created.append(name)
        return out


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("mode", ["galore", "galore_8bit"])
def test_tied_embedding_lookup_rows_are_added_in_place_with_the_normal_update(mode, accumulation):
    """Tied input/output embeddings: the same update as a normal step (padding row, gradient accumulation)."""
    reference = tied_llama(mode)
    model = copy.deepcopy(reference)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    data = tied_batches(GAP * accumulation)  # before the second refresh: SVD bases amplify rounding differences
    train_reference(reference, data, accumulation, mode)
    train_layerwise(model, data, accumulation, mode)
    assert_same_parameters(reference, model, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("inplace, expected", [(True, ["mm"]), (False, ["mm", "embedding_dense_backward", "add"])])
def test_tied_embedding_backward_creates_one_full_size_gradient(inplace, expected):
    """Until the tied weight is stepped, backward creates only the head's vocab x hidden gradient; autograd's
    default also creates the lookup's and their sum."""
    model = tied_llama()
    weight = model.get_input_embeddings().weight
    inner = make_optimizer(model)
    step_parameter = inner.step_parameter
    counter = FullSizeTensors(weight.shape)

    def stop_at_the_tied_step(p, group):
        counter.active = counter.active and p is not weight
        step_parameter(p, group)

    inner.step_parameter = stop_at_the_tied_step
    optimizer = make_layerwise(inner, model, inplace_tied_embeddings=inplace)
    ids = tied_batches(1)[0]
    loss = model(input_ids=ids, labels=ids).loss
    with counter:
        loss.backward()
    optimizer.remove_hooks()
    assert not counter.active  # the tied weight was stepped inside backward
    assert counter.created == expected


def test_tied_lookup_routing_leaves_eval_and_untied_models_alone():
    model = tied_llama()
    optimizer = make_layerwise(make_optimizer(model), model)
    ids = tied_batches(1)[0]
    with torch.no_grad():
        assert model(input_ids=ids).logits.grad_fn is None
    optimizer.remove_hooks()
    untied = make_tiny_llama()
    optimizer = make_layerwise(make_optimizer(untied), untied)
    assert len(optimizer._hooks) == len(list(untied.parameters())) + 1  # a grad hook each and the forward pre-hook
    optimizer.remove_hooks()
