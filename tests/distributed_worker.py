"""Multi-process scenarios for tests/test_distributed.py, run as

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py {ddp|fsdp2} OUT_DIR

Every rank saves what it ended with to ``OUT_DIR/<scenario>-rank<r>.pt``; the test compares ranks with each other
and with single-process runs of the same functions (``python -c`` free: the test imports this module).
"""
import os
import sys
from pathlib import Path

import torch


STEPS = 6  # refreshes at steps 0, 2, 4 (GAP 2): three refreshes
GAP = 2
PER_RANK_BATCH = 2
SEQ = 16
VOCAB = 256
LR = 1e-2


def tiny_llama(seed=0, mode="adamw"):
    """The tiny LLaMA, prepared for ``mode`` (quantized weights for ``q_galore``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_lowrank.optim import get_mode

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if get_mode(VARIANTS.get(mode, (mode,))[0]).quantized_weights:
        from hf_lowrank.qgalore import prepare_model_for_qgalore

        prepare_model_for_qgalore(model, group_size=64)
    return model


def global_batches(steps=STEPS, world_size=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (PER_RANK_BATCH * world_size, SEQ), generator=generator) for _ in range(steps)]


# FRUGAL with an SGD residual: signSGD's sign(x) is discontinuous at 0, so residual entries within rounding of 0
# step by +-lr on one layout and -+lr on another; with an SGD residual the same code path is continuous.
VARIANTS = {"frugal_sgd": ("frugal", {"residual": "sgd"})}


def scenario_modes():
    from hf_lowrank.optim import available_modes

    return available_modes() + sorted(VARIANTS)


def make_optimizer(model, name, **extra):
    from hf_lowrank.optim import create_optimizer

    mode, options = VARIANTS.get(name, (name, {}))
    return create_optimizer(model, mode, **mode_options(mode), **options, **extra)


def mode_options(mode):
    """Options under which every mode is deterministic across layouts: sign-aligned SVD bases."""
    from hf_lowrank.optim import get_mode

    spec = get_mode(mode)
    options = {"lr": LR, "weight_decay": 0.01}
    if spec.projector is not None:
        options["update_proj_gap"] = GAP
        if "density" not in spec.defaults:
            options["rank"] = 8
        if spec.projector in ("svd", "randomized", "subspace"):
            options["sign_convention"] = "align"
    if spec.inner == "adamw8bit":
        options["min_8bit_size"] = 256
    return options


def local_batch(ids, rank, world_size):
    """This rank's slice of the global batch (all of it in one process)."""
    return ids.chunk(world_size)[rank] if world_size > 1 else ids


def train(model, optimizer, data, rank=0, world_size=1, accumulation=1, step=True):
    """Plain loop: forward/backward on this rank's slice (accumulated over ``accumulation`` micro-batches)."""
    losses = []
    for ids in data:
        ids = local_batch(ids, rank, world_size)
        micro = ids.chunk(accumulation)
        for index, part in enumerate(micro):
            last = index == len(micro) - 1
            context = model.no_sync() if (not last and hasattr(model, "no_sync")) else _null()
            with context:
                loss = model(input_ids=part, labels=part).loss / accumulation
                loss.backward()
            losses.append(loss.item() * accumulation)
        if step:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def full_parameters(model):
    """Full (gathered) parameters by name, on CPU; a quantized weight (update sink) as its dequantized value."""
    from hf_lowrank.optim.distributed import is_dtensor
    from hf_lowrank.optim.sinks import update_sink_of

    def value(p):
        sink = update_sink_of(p)
        return sink.begin() if sink is not None else p.full_tensor() if is_dtensor(p) else p

    return {n: value(p).detach().cpu().clone() for n, p in model.named_parameters()}


def flat_state(optimizer):
    """Every optimizer-state tensor by (param index, key), on CPU; DTensors gathered."""
    from hf_lowrank.optim.distributed import is_dtensor

    out = {}

    def add(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}.{k}", v)
        elif torch.is_tensor(value):
            out[prefix] = (value.full_tensor() if is_dtensor(value) else value).detach().cpu().clone()
        else:
            out[prefix] = value

    for index, entry in optimizer.state_dict()["state"].items():
        add(str(index), entry)
    return out


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def ddp_scenarios(out: Path, rank: int, world_size: int):
    from torch.nn.parallel import DistributedDataParallel

    from hf_lowrank.optim import create_optimizer

    data = global_batches(world_size=world_size)
    for mode in scenario_modes():
        for layerwise in (False, True):
            model = tiny_llama(mode=mode)
            ddp = DistributedDataParallel(model)
            optimizer = make_optimizer(ddp, mode, layerwise=layerwise)
            losses = train(ddp, optimizer, data, rank, world_size)
            name = f"ddp-{mode}-{'layerwise' if layerwise else 'plain'}"
            if layerwise:
                optimizer.remove_hooks()
            inner = getattr(optimizer, "optimizer", optimizer)
            torch.save({"params": full_parameters(model), "state": flat_state(inner), "losses": losses,
                        "fitted": inner.comm.refreshes_fitted}, out / f"{name}-rank{rank}.pt")
    # layer-wise with gradient accumulation (no_sync on the inner micro-batch) vs a plain DDP step
    for layerwise in (False, True):
        model = tiny_llama()
        ddp = DistributedDataParallel(model)
        optimizer = create_optimizer(ddp, "galore", layerwise=layerwise, gradient_accumulation_steps=2 if layerwise
                                     else None, **mode_options("galore"))
        train(ddp, optimizer, data, rank, world_size, accumulation=2)
        if layerwise:
            optimizer.remove_hooks()
        torch.save({"params": full_parameters(model)},
                   out / f"ddp-ga-{'layerwise' if layerwise else 'plain'}-rank{rank}.pt")
    # a non-finite local gradient on one rank (before DDP's all-reduce): every rank skips the whole step
    model = tiny_llama()
    ddp = DistributedDataParallel(model)
    optimizer = create_optimizer(ddp, "galore", **mode_options("galore"))
    train(ddp, optimizer, data[:1], rank, world_size)
    ids = local_batch(data[1], rank, world_size)
    if rank == 1:
        model.model.layers[0].mlp.up_proj.weight.register_hook(lambda grad: grad.index_fill(0, grad.new_tensor(
            [0], dtype=torch.long), float("nan")))
    ddp(input_ids=ids, labels=ids).loss.backward()
    before = full_parameters(model)
    optimizer.step()
    after = full_parameters(model)
    torch.save({"unchanged": all(torch.equal(before[n], after[n]) for n in before),
                "report": optimizer.nonfinite_report()}, out / f"ddp-nonfinite-rank{rank}.pt")


def trainer_scenarios(out: Path, rank: int, world_size: int):
    """Trainer (DDP through Accelerate) building the optimizer through transformers' factory protocol: layer-wise
    with gradient accumulation must give the same model as the normal step."""
    from transformers import Trainer, TrainingArguments

    from hf_lowrank import LayerwiseGradNormCallback, optimizer_factory

    examples = [{"input_ids": ids, "labels": ids} for batch in global_batches(steps=8) for ids in batch]
    for layerwise in (False, True):
        model = tiny_llama()
        args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=1,
                                 gradient_accumulation_steps=2, max_steps=4, use_cpu=True, report_to=[],
                                 logging_steps=1, max_grad_norm=0.0, save_strategy="no", seed=0,
                                 disable_tqdm=True, dataloader_drop_last=True)
        factory = optimizer_factory("galore", layerwise=layerwise, **mode_options("galore"))
        trainer = Trainer(model=model, args=args, train_dataset=examples, optimizer_cls_and_kwargs=factory,
                          callbacks=[LayerwiseGradNormCallback()])
        trainer.train()
        assert trainer.args.world_size == world_size == 2
        grad_norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
        torch.save({"params": full_parameters(model), "grad_norms": grad_norms,
                    "wrapped": type(trainer.model_wrapped).__name__},
                   out / f"trainer-{'layerwise' if layerwise else 'plain'}-rank{rank}.pt")


FSDP_MODES = ("adamw", "galore", "galore_randomized", "galore_dct", "galore_random", "frugal", "frugal_sgd")


def fsdp2_scenarios(out: Path, rank: int, world_size: int):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from hf_lowrank.optim import create_optimizer

    data = global_batches(world_size=world_size)
    for mode in FSDP_MODES:
        for layerwise in (False, True) if mode in ("adamw", "galore") else (False,):
            model = shard(tiny_llama())
            optimizer = make_optimizer(model, mode, layerwise=layerwise)
            losses = train(model, optimizer, data, rank, world_size)
            if layerwise:
                optimizer.remove_hooks()
            inner = getattr(optimizer, "optimizer", optimizer)
            name = f"fsdp2-{mode}-{'layerwise' if layerwise else 'plain'}"
            torch.save({"params": full_parameters(model), "state": flat_state(inner), "losses": losses,
                        "comm": (inner.comm.step_bytes, inner.comm.refresh_bytes)}, out / f"{name}-rank{rank}.pt")
    # checkpoint after 3 steps (mid-period: the next step does not refresh), resume on 2 processes
    checkpoint = out / "fsdp2-checkpoint"
    model = shard(tiny_llama())
    optimizer = create_optimizer(model, "galore", **mode_options("galore"))
    train(model, optimizer, data[:3], rank, world_size)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(checkpoint))
    train(model, optimizer, data[3:], rank, world_size)
    uninterrupted = full_parameters(model)
    resumed_model = shard(tiny_llama(seed=1))  # different weights: everything must come from the checkpoint
    resumed = create_optimizer(resumed_model, "galore", **mode_options("galore"))
    model_sd, optim_sd = get_state_dict(resumed_model, resumed)
    target = {"model": model_sd, "optim": optim_sd}
    dcp.load(target, checkpoint_id=str(checkpoint))
    set_state_dict(resumed_model, resumed, model_state_dict=target["model"], optim_state_dict=target["optim"])
    train(resumed_model, resumed, data[3:], rank, world_size)
    torch.save({"uninterrupted": uninterrupted, "resumed": full_parameters(resumed_model)},
               out / f"fsdp2-resume-rank{rank}.pt")
    # a non-finite gradient in one rank's rows only: every rank must skip
    model = shard(tiny_llama())
    optimizer = create_optimizer(model, "galore", **mode_options("galore"))
    train(model, optimizer, data[:1], rank, world_size)
    ids = local_batch(data[1], rank, world_size)
    model(input_ids=ids, labels=ids).loss.backward()
    if rank == 1:
        model.model.layers[0].mlp.up_proj.weight.grad.to_local()[0, 0] = float("nan")
    before = full_parameters(model)
    optimizer.step()
    after = full_parameters(model)
    torch.save({"unchanged": all(torch.equal(before[n], after[n]) for n in before),
                "report": optimizer.nonfinite_report()}, out / f"fsdp2-nonfinite-rank{rank}.pt")
    # Q-GaLore's INT8 layers under FSDP2: refused with a clear error, never silently untrained
    refused = {}
    for mode in ("q_galore", "galore"):
        model = shard(tiny_llama(mode="q_galore"))
        try:
            optimizer = create_optimizer(model, mode, **mode_options(mode))
            ids = local_batch(data[0], rank, world_size)
            model(input_ids=ids, labels=ids).loss.backward()
        except (NotImplementedError, ValueError) as err:
            refused[mode] = f"{type(err).__name__}: {err}"
    torch.save(refused, out / f"fsdp2-qgalore-refused-rank{rank}.pt")


DEEPSPEED_MODES = ("adamw", "adamw_8bit", "galore", "galore_8bit", "galore_dct", "galore_random", "frugal_sgd")


def deepspeed_scenarios(out: Path, rank: int, world_size: int):
    """DeepSpeed ZeRO-1/2 (CPU accelerator, gloo): the ZeRO optimizer wraps ours; attach_zero maps the flat
    partitions to the matrices."""
    import deepspeed

    from hf_lowrank.optim.deepspeed import attach_zero

    data = global_batches(world_size=world_size)
    for stage in (1, 2):
        for mode in DEEPSPEED_MODES:
            model = tiny_llama()
            config = {"train_micro_batch_size_per_gpu": PER_RANK_BATCH, "gradient_clipping": 0.0,
                      "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                      "steps_per_print": 10**9}
            engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, mode),
                                                      config=config)
            attach_zero(zero)
            for ids in data:
                ids = local_batch(ids, rank, world_size)
                engine.backward(engine(input_ids=ids, labels=ids).loss)
                engine.step()
            torch.save({"params": full_parameters(model)}, out / f"deepspeed{stage}-{mode}-rank{rank}.pt")
    # refused combinations, each with its clear error
    refused = {}
    for mode, extra in (("galore_adafactor", {}), ("galore", {"layerwise": True})):
        model = tiny_llama()
        config = {"train_micro_batch_size_per_gpu": PER_RANK_BATCH, "zero_optimization": {"stage": 2},
                  "zero_allow_untested_optimizer": True}
        try:
            optimizer = make_optimizer(model, mode, **extra)
            _, zero, _, _ = deepspeed.initialize(model=model, optimizer=getattr(optimizer, "optimizer", optimizer)
                                                 if not extra else optimizer, config=config)
            attach_zero(zero)
        except (NotImplementedError, TypeError, ValueError) as err:
            refused[mode + ("-layerwise" if extra else "")] = f"{type(err).__name__}: {err}"
    torch.save(refused, out / f"deepspeed-refused-rank{rank}.pt")
    # Trainer with DeepSpeed ZeRO-2: the factory builds the optimizer, the callback attaches it
    from transformers import Trainer, TrainingArguments

    from hf_lowrank import optimizer_factory
    from hf_lowrank.optim.deepspeed import DeepSpeedZeroCallback

    examples = [{"input_ids": ids, "labels": ids} for batch in global_batches(steps=8) for ids in batch]
    model = tiny_llama()
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True, "gradient_clipping": "auto"}
    args = TrainingArguments(output_dir=str(out / "trainer-deepspeed"), per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, max_steps=4, use_cpu=True, report_to=[], logging_steps=1,
                             max_grad_norm=0.0, save_strategy="no", seed=0, disable_tqdm=True,
                             dataloader_drop_last=True, deepspeed=config)
    trainer = Trainer(model=model, args=args, train_dataset=examples, callbacks=[DeepSpeedZeroCallback()],
                      optimizer_cls_and_kwargs=optimizer_factory("galore", **mode_options("galore")))
    trainer.train()
    assert trainer.args.world_size == world_size == 2
    torch.save({"params": full_parameters(model), "wrapped": type(trainer.model_wrapped).__name__},
               out / f"trainer-deepspeed-rank{rank}.pt")


def main():
    import torch.distributed as dist

    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert world_size == int(os.environ["WORLD_SIZE"]) == 2, world_size
    out.mkdir(parents=True, exist_ok=True)
    try:
        {"ddp": ddp_scenarios, "fsdp2": fsdp2_scenarios, "trainer": trainer_scenarios,
         "deepspeed": deepspeed_scenarios}[scenario](out, rank, world_size)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
