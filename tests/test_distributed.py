"""Distributed training (2 gloo processes, 1 thread each): DDP for every mode, layer-wise too, and FSDP2.

The scenarios run in ``tests/distributed_worker.py`` under ``torchrun``; each asserts its world size is 2 (an
``accelerate launch --cpu`` mistake would silently run one process). Single-process references run here, with
the same functions, on the global batch (2 x the per-rank batch).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import distributed_worker as worker


pytestmark = pytest.mark.multiprocess
ROOT = Path(__file__).resolve().parents[1]
# Relative error of the parameter update against the single-process run. fp32 summation order differs (the
# gradient is averaged over ranks); Adam normalises tiny gradients, so ~1e-5..1e-3 is what fp32 gives here.
UPDATE_RTOL = 1e-3
LOOSER = {
    # signSGD's sign(x) is discontinuous at 0: residual entries within rounding of 0 step +-lr on one layout and
    # -+lr on the other; replicas are still bit-identical, and frugal_sgd checks the same code path continuously.
    "frugal": None,
    # FRUGAL's rank is 25% of the dimension; on this tiny batch the trailing singular values are nearly
    # degenerate, so the subspace itself is sensitive to the 1e-7 gradient differences (the error depends on the
    # CPU's vector width: 3.2e-2 seen without AVX-512).
    "frugal_sgd": 5e-2,
    # 8-bit moments: a moment within fp32 rounding of a code boundary lands one code apart (1.7e-3 seen without
    # AVX-512); replicas still agree bit for bit.
    "adamw_8bit": 1e-2,
    # Re-quantizing INT8 weights is a step function of the weight: an entry within fp32 rounding of a level
    # boundary lands one level apart on the two layouts (replicas agree bit for bit; see the replica test).
    "q_galore": 5e-2,
}


def run_worker(scenario, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "tests" / "distributed_worker.py"), scenario, str(out)]
    result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    for scenario in ("ddp", "fsdp2", "trainer", "deepspeed"):
        run_worker(scenario, out)
    return out


def load(results, name):
    return [torch.load(results / f"{name}-rank{rank}.pt", weights_only=True) for rank in (0, 1)]


@pytest.fixture(scope="module")
def single_process():
    """Final parameters / state of the one-process run with the global batch, per mode."""
    cache = {}

    def get(mode):
        if mode not in cache:
            model = worker.tiny_llama(mode=mode)
            optimizer = worker.make_optimizer(model, mode)
            worker.train(model, optimizer, worker.global_batches())
            cache[mode] = worker.full_parameters(model), worker.flat_state(optimizer), optimizer
        return cache[mode]

    return get


def update_error(params, reference):
    initial = worker.full_parameters(worker.tiny_llama())
    diff = sum(((params[n] - reference[n]) ** 2).sum() for n in reference).sqrt()
    moved = sum(((reference[n] - initial[n]) ** 2).sum() for n in reference).sqrt()
    return (diff / moved).item()


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key, value in a.items():
        if torch.is_tensor(value):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


MODES = worker.scenario_modes()


@pytest.mark.parametrize("kind", ["plain", "layerwise"])
@pytest.mark.parametrize("mode", MODES)
def test_ddp_replicas_are_bit_identical_after_three_refreshes(results, mode, kind):
    rank0, rank1 = load(results, f"ddp-{mode}-{kind}")
    assert_identical(rank0["params"], rank1["params"])
    assert_identical(rank0["state"], rank1["state"])


@pytest.mark.parametrize("mode", MODES)
def test_ddp_two_processes_match_one_process_with_twice_the_batch(results, single_process, mode):
    reference, _, _ = single_process(mode)
    tolerance = LOOSER.get(mode, UPDATE_RTOL)
    rank0, _ = load(results, f"ddp-{mode}-plain")
    if tolerance is not None:
        assert update_error(rank0["params"], reference) < tolerance


@pytest.mark.parametrize("mode", MODES)
def test_ddp_layerwise_equals_the_normal_ddp_step(results, mode):
    plain, _ = load(results, f"ddp-{mode}-plain")
    layerwise, _ = load(results, f"ddp-{mode}-layerwise")
    assert_identical(plain["params"], layerwise["params"])


def test_ddp_layerwise_with_gradient_accumulation_equals_the_normal_step(results):
    plain, _ = load(results, "ddp-ga-plain")
    layerwise, other_rank = load(results, "ddp-ga-layerwise")
    assert_identical(plain["params"], layerwise["params"])
    assert_identical(layerwise["params"], other_rank["params"])


def test_ddp_refresh_work_is_divided_between_the_ranks(results, single_process):
    _, _, optimizer = single_process("galore")
    rank0, rank1 = load(results, "ddp-galore-plain")
    total = optimizer.comm.refreshes_fitted
    assert rank0["fitted"] + rank1["fitted"] == total  # every refresh computed exactly once
    assert max(rank0["fitted"], rank1["fitted"]) <= 0.6 * total


def test_ddp_a_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(results):
    for rank in load(results, "ddp-nonfinite"):
        assert rank["unchanged"] and rank["report"] == {"skipped_steps": 1}


FSDP_RUNS = [(mode, "plain") for mode in worker.FSDP_MODES] + [("adamw", "layerwise"), ("galore", "layerwise")]


@pytest.mark.parametrize("mode, kind", FSDP_RUNS)
def test_fsdp2_matches_one_process(results, single_process, mode, kind):
    reference, reference_state, _ = single_process(mode)
    rank0, rank1 = load(results, f"fsdp2-{mode}-{kind}")
    assert_identical(rank0["params"], rank1["params"])  # gathered shards agree
    tolerance = LOOSER.get(mode, UPDATE_RTOL)
    if tolerance is not None:
        assert update_error(rank0["params"], reference) < tolerance
    # the gathered optimizer state has exactly the single-process layout (consolidation needs nothing else)
    assert rank0["state"].keys() == reference_state.keys()
    for key, value in reference_state.items():
        if torch.is_tensor(value):
            assert rank0["state"][key].shape == value.shape and rank0["state"][key].dtype == value.dtype, key


def test_fsdp2_layerwise_equals_the_normal_step(results):
    for mode in ("adamw", "galore"):
        plain, _ = load(results, f"fsdp2-{mode}-plain")
        layerwise, _ = load(results, f"fsdp2-{mode}-layerwise")
        assert_identical(plain["params"], layerwise["params"])


def test_fsdp2_communication_is_counted(results):
    (step, refresh), _ = [r["comm"] for r in load(results, "fsdp2-galore-plain")]
    assert step > 0 and refresh > 0  # left projections all-reduce r x n; refreshes gather and broadcast
    (_, random_refresh), _ = [r["comm"] for r in load(results, "fsdp2-galore_random-plain")]
    assert random_refresh == 0  # a seeded random basis needs no communication


def test_fsdp2_checkpoint_resumes_on_two_processes_exactly(results):
    for rank in load(results, "fsdp2-resume"):
        assert_identical(rank["uninterrupted"], rank["resumed"])


def test_fsdp2_checkpoint_consolidates_and_resumes_in_one_process(results):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import set_state_dict

    consolidated = results / "consolidated.pt"
    dcp_to_torch_save(results / "fsdp2-checkpoint", consolidated)
    checkpoint = torch.load(consolidated, weights_only=True)
    model = worker.tiny_llama(seed=1)
    optimizer = worker.make_optimizer(model, "galore")
    set_state_dict(model, optimizer, model_state_dict=checkpoint["model"], optim_state_dict=checkpoint["optim"])
    worker.train(model, optimizer, worker.global_batches()[3:])
    uninterrupted = load(results, "fsdp2-resume")[0]["uninterrupted"]
    for name, value in worker.full_parameters(model).items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=0, atol=1e-4)


def test_fsdp2_a_nonfinite_gradient_in_one_shard_skips_the_step_on_every_rank(results):
    for rank in load(results, "fsdp2-nonfinite"):
        assert rank["unchanged"] and rank["report"] == {"skipped_steps": 1}


def test_trainer_builds_the_optimizer_through_the_factory_protocol_under_ddp(results):
    plain, _ = load(results, "trainer-plain")
    layerwise, other_rank = load(results, "trainer-layerwise")
    assert plain["wrapped"] == layerwise["wrapped"] == "DistributedDataParallel"
    assert_identical(plain["params"], layerwise["params"])  # layer-wise + gradient accumulation 2 under DDP
    assert_identical(layerwise["params"], other_rank["params"])
    torch.testing.assert_close(torch.tensor(layerwise["grad_norms"]), torch.tensor(plain["grad_norms"]))


# 8-bit state is quantised in blocks of the flat ZeRO partition (not of each tensor), so it rounds differently.
DEEPSPEED_RTOL = {"adamw_8bit": 5e-2, "galore_8bit": 5e-2, "frugal_sgd": LOOSER["frugal_sgd"]}


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("mode", worker.DEEPSPEED_MODES)
def test_deepspeed_zero_matches_one_process(results, single_process, mode, stage):
    reference, _, _ = single_process(mode)
    rank0, rank1 = load(results, f"deepspeed{stage}-{mode}")
    assert_identical(rank0["params"], rank1["params"])
    assert update_error(rank0["params"], reference) < DEEPSPEED_RTOL.get(mode, UPDATE_RTOL)


def test_deepspeed_refuses_what_a_flat_partition_cannot_do(results):
    refused, _ = load(results, "deepspeed-refused")
    assert "inner='adafactor' factors the second moment" in refused["galore_adafactor"]
    assert "layer-wise optimizers are not supported under DeepSpeed" in refused["galore-layerwise"]


def test_trainer_with_deepspeed_zero2_matches_trainer_with_ddp(results):
    deepspeed_run, _ = load(results, "trainer-deepspeed")
    ddp_run, _ = load(results, "trainer-plain")
    assert deepspeed_run["wrapped"] == "DeepSpeedEngine"
    assert update_error(deepspeed_run["params"], ddp_run["params"]) < UPDATE_RTOL  # same losses, fp32 accuracy


def test_fsdp2_refuses_quantized_layers_clearly(results):
    refused, _ = load(results, "fsdp2-qgalore-refused")
    assert "FSDP2 (fully_shard) cannot shard" in refused["q_galore"]
    assert "would never reach its INT8 codes" in refused["galore"]
