"""Trainer integration: a run stopped at a checkpoint and resumed reproduces the uninterrupted run, for every mode,
layer-wise or not, with the stop just before and just after a projector refresh."""
import shutil
import types

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_lowrank.callbacks import LayerwiseGradNormCallback
from hf_lowrank.optim import available_modes, create_optimizer, get_mode, optimizer_cls_and_kwargs
from hf_lowrank.optim.layerwise import LayerwiseOptimizer
from tests.conftest import make_tiny_llama, prepare_for_mode


STEPS = 7
GAP = 3  # projectors refresh at optimizer steps 0, 3, 6 (0-based: before the 1st, 4th and 7th update)
# checkpoint-3 holds 3 updates: the first step after resuming is a refresh ("just before").
# checkpoint-4 holds the refresh of the 4th update: the resumed steps must reuse its projector ("just after").
STOPS = {"before_refresh": 3, "after_refresh": 4}


def dataset(samples=32, seq=32, vocab=256):
    ids = torch.randint(0, vocab, (samples, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def mode_options(mode):
    spec = get_mode(mode)
    options = {"lr": 1e-2, "weight_decay": 0.01}
    if spec.projector is not None:
        options["update_proj_gap"] = GAP
        if "density" not in spec.defaults:
            options["rank"] = 8
    if spec.inner == "adamw8bit":
        options["min_8bit_size"] = 256  # the tiny model's blocks are small: make them 8-bit too
    return options


class SaveAt(TrainerCallback):
    """Checkpoint at exactly these global steps."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_step_end(self, args, state, control, **kwargs):
        control.should_save = state.global_step in self.steps


def train(output_dir, make_optimizer=None, accumulation=1, resume=None, save_at=(), make_cls_and_kwargs=None,
          mode="adamw"):
    """Train the tiny LLaMA (prepared for ``mode``); ``make_optimizer(model)`` / ``make_cls_and_kwargs(model)`` pick
    the Trainer entry point."""
    model = prepare_for_mode(make_tiny_llama(), mode)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        max_grad_norm=0.0,  # layer-wise cannot clip globally; same setting everywhere keeps runs comparable
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset(),
        optimizers=(make_optimizer(model) if make_optimizer else None, None),
        optimizer_cls_and_kwargs=make_cls_and_kwargs(model) if make_cls_and_kwargs else None,
        callbacks=[SaveAt(save_at), LayerwiseGradNormCallback()],
    )
    trainer.train(resume_from_checkpoint=resume)
    optimizer = trainer.optimizer
    if isinstance(getattr(optimizer, "optimizer", None), LayerwiseOptimizer):
        optimizer.optimizer.remove_hooks()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def losses(history):
    return [entry["loss"] for entry in history]


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """Uninterrupted runs (checkpointing at the stops), computed once per (mode, layerwise, accumulation)."""
    cache = {}

    def get(mode, layerwise, accumulation=1):
        key = (mode, layerwise, accumulation)
        if key not in cache:
            output_dir = tmp_path_factory.mktemp(f"{mode}-{layerwise}-{accumulation}")
            factory = lambda model: create_optimizer(model, mode, layerwise=layerwise, **mode_options(mode))  # noqa: E731
            history = train(output_dir, factory, accumulation, save_at=STOPS.values(), mode=mode)
            cache[key] = output_dir, history
        return cache[key]

    return get


def test_plain_adamw_resume_is_exact(tmp_path):
    """Baseline: Trainer restores data order, RNG and scheduler, so torch's AdamW resumes exactly."""
    full = train(tmp_path, save_at=[3])
    resumed = train(tmp_path / "resumed", resume=tmp_path / "checkpoint-3")
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6, rel=0)
    assert len(full) == STEPS


RESUME_CASES = [
    pytest.param(mode, layerwise, stop, id=f"{mode}-{'layerwise' if layerwise else 'step'}-{stop}")
    for mode in available_modes()
    for layerwise in (False, True)
    for stop in STOPS
    if get_mode(mode).projector is not None or stop == "before_refresh"  # nothing to refresh without a projector
]


@pytest.mark.parametrize("mode, layerwise, stop", RESUME_CASES)
def test_resume_reproduces_uninterrupted_losses(full_runs, tmp_path, mode, layerwise, stop):
    output_dir, full = full_runs(mode, layerwise)
    checkpoint = output_dir / f"checkpoint-{STOPS[stop]}"
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert state["state"], "the checkpoint must hold the real optimizer state"
    factory = lambda model: create_optimizer(model, mode, layerwise=layerwise, **mode_options(mode))  # noqa: E731
    resumed = train(tmp_path, factory, resume=checkpoint, mode=mode)
    assert [e["step"] for e in resumed] == list(range(1, STEPS + 1))
    assert losses(resumed) == pytest.approx(losses(full), abs=1e-6, rel=0)


def test_checkpoints_are_interchangeable_between_step_and_layerwise(full_runs, tmp_path):
    """Same state_dict format: a run checkpointed with normal steps can continue layer-wise, exactly."""
    output_dir, stepped = full_runs("galore", False)
    factory = lambda model: create_optimizer(model, "galore", layerwise=True, **mode_options("galore"))  # noqa: E731
    resumed = train(tmp_path, factory, resume=output_dir / "checkpoint-4")
    assert losses(resumed) == pytest.approx(losses(stepped), abs=1e-6, rel=0)


def test_resume_without_the_optimizer_state_would_differ(full_runs, tmp_path):
    """The resume test is sharp: dropping optimizer.pt changes the losses after the stop."""
    output_dir, full = full_runs("galore", True)
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(output_dir / "checkpoint-4", checkpoint)
    (checkpoint / "optimizer.pt").unlink()
    factory = lambda model: create_optimizer(model, "galore", layerwise=True, **mode_options("galore"))  # noqa: E731
    resumed = train(tmp_path / "out", factory, resume=checkpoint)
    assert losses(resumed)[:4] == losses(full)[:4]
    assert abs(losses(resumed)[5] - losses(full)[5]) > 1e-4


@pytest.mark.parametrize("accumulation", [1, 2])
def test_layerwise_trainer_matches_step_and_logs_true_grad_norm(full_runs, tmp_path, accumulation):
    _, stepped = full_runs("galore", False, accumulation)
    output_dir, layerwise = full_runs("galore", True, accumulation)
    assert losses(layerwise) == pytest.approx(losses(stepped), abs=1e-6, rel=0)
    true_norms = [e["grad_norm"] for e in stepped]  # Trainer's own clip_grad_norm_(inf) on full gradients
    assert min(true_norms) > 0
    assert [e["grad_norm"] for e in layerwise] == pytest.approx(true_norms, rel=1e-5)
    if accumulation == 2:  # and the accumulated run resumes exactly too
        factory = lambda model: create_optimizer(model, "galore", layerwise=True, **mode_options("galore"))  # noqa: E731
        resumed = train(tmp_path, factory, accumulation, resume=output_dir / "checkpoint-3")
        assert losses(resumed) == pytest.approx(losses(layerwise), abs=1e-6, rel=0)


def test_optimizer_cls_and_kwargs_entry_points(full_runs, tmp_path):
    """TrainingArguments stays the single config: Trainer builds the optimizer itself, same result."""
    options = mode_options("galore")
    _, stepped = full_runs("galore", False)
    _, layerwise = full_runs("galore", True)
    with_cls = train(tmp_path / "cls", make_cls_and_kwargs=lambda model: optimizer_cls_and_kwargs(model, "galore", **options))
    assert losses(with_cls) == pytest.approx(losses(stepped), abs=1e-6, rel=0)
    # A factory (not an Optimizer class) is called by Trainer as factory()(model, **kwargs): no model needed up front.
    factory = (lambda: create_optimizer, {"mode": "galore", "layerwise": True, **options})
    with_factory = train(tmp_path / "factory", make_cls_and_kwargs=lambda model: factory)
    assert losses(with_factory) == pytest.approx(losses(layerwise), abs=1e-6, rel=0)
    assert [e["grad_norm"] for e in with_factory] == pytest.approx([e["grad_norm"] for e in stepped], rel=1e-5)


def test_callback_refuses_global_clipping_and_fp16(tmp_path):
    callback = LayerwiseGradNormCallback()
    model = make_tiny_llama()
    layerwise = create_optimizer(model, "galore", layerwise=True, **mode_options("galore"))
    try:
        with pytest.raises(ValueError, match="max_grad_norm=0"):
            callback.on_train_begin(types.SimpleNamespace(max_grad_norm=1.0, fp16=False), None, None, optimizer=layerwise)
        with pytest.raises(ValueError, match="bf16"):
            callback.on_train_begin(types.SimpleNamespace(max_grad_norm=0.0, fp16=True), None, None, optimizer=layerwise)
    finally:
        layerwise.remove_hooks()
    stepped = create_optimizer(model, "galore", **mode_options("galore"))
    callback.on_train_begin(types.SimpleNamespace(max_grad_norm=1.0, fp16=True), None, None, optimizer=stepped)


def test_layerwise_without_the_callback_still_refuses_clipping_and_logs_the_true_grad_norm(tmp_path, full_runs):
    """The guard does not depend on the user adding LayerwiseGradNormCallback."""
    from transformers import Trainer, TrainingArguments

    def run(max_grad_norm):
        model = make_tiny_llama()
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
                                 learning_rate=1e-2, max_grad_norm=max_grad_norm, logging_steps=1, report_to=[],
                                 use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0)
        optimizer = create_optimizer(model, "galore", layerwise=True, **mode_options("galore"))
        trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(optimizer, None))
        try:
            trainer.train()
        finally:
            optimizer.remove_hooks()
        return [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]

    with pytest.raises(ValueError, match="max_grad_norm=1.0 cannot be applied with layer-wise updates"):
        run(1.0)
    _, stepped = full_runs("galore", False)
    assert run(0.0) == pytest.approx([e["grad_norm"] for e in stepped], rel=1e-5)
