"""No silent failure: the bad-input table (every entry stops with an error that names the parameter and the fix,
or warns where the input is legal but selects nothing), and the paths that used to run and do something else:
GPT-2's Conv1D, a checkpoint of another mode, a rank that projects nothing, one meaning of ``all-linear``."""
import io
import warnings

import pytest
import torch
from torch import nn

from hf_lowrank.optim import create_optimizer, optimizer_state_bytes
from tests.conftest import make_tiny_llama


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=32))


def galore_checkpoint():
    model = make_tiny_llama()
    optimizer = create_optimizer(model, "galore", rank=8)
    ids = torch.randint(0, 256, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    return model, torch.load(buffer, weights_only=True)


def load_into(mode, **options):
    model, state = galore_checkpoint()
    create_optimizer(model, mode, **options).load_state_dict(state)


def prepared():
    from hf_lowrank.qgalore import prepare_model_for_qgalore

    return prepare_model_for_qgalore(make_tiny_llama(), group_size=64)


def qgalore(**options):
    from hf_lowrank.qgalore import prepare_model_for_qgalore

    prepare_model_for_qgalore(make_tiny_llama(), **{"group_size": 64, **options})


def welore(**config):
    from hf_lowrank.welore import WeLoreConfig, compress

    compress(make_tiny_llama(), WeLoreConfig(**config))


def gradnormlorp(**config):
    from hf_lowrank.gradnormlorp import GradNormLoRPConfig

    GradNormLoRPConfig(**config)


def tuner_save(tmp_path):
    from hf_lowrank.welore import WeLoreConfig, compress

    compress(make_tiny_llama(), WeLoreConfig(rank_reduction=0.5)).save_pretrained(str(tmp_path),
                                                                                   safe_serialization=False)


def load_tuner_from(tmp_path):
    from hf_lowrank.tuners import load_tuner

    load_tuner(make_tiny_llama(), str(tmp_path))


def tpsgd_config(**config):
    from hf_lowrank.tpsgd import TpSGDConfig

    TpSGDConfig(**config)


def tpsgd_model(network):
    from hf_lowrank.tpsgd import TpSGDModel

    TpSGDModel(network)


def continual_config(**config):
    from hf_lowrank.cuber import ContinualConfig

    ContinualConfig(**config)


def recipe(*overrides):
    from recipes import pretrain

    pretrain.main([*overrides, "progress=false", "max_seq_length=32", "eval_batches=1", "eval_batch_size=2"])


def cli_error(capsys, *args):
    from hf_lowrank import cli

    assert cli.main(list(args)) == 2
    raise ValueError(capsys.readouterr().err)


# (area, what the user did, call, exception, message) -- the message must name the parameter and the fix
BAD_INPUTS = [
    ("optimizer", "unknown mode", lambda t, c: create_optimizer(make_tiny_llama(), "galor"), ValueError,
     r"Unknown optimizer mode 'galor'\. Available modes: .*galore"),
    ("optimizer", "target_modules=5", lambda t, c: create_optimizer(make_tiny_llama(), target_modules=5), TypeError,
     r"`target_modules` must be 'all-linear', a regex string or a list of module names, got int 5"),
    ("optimizer", "a non-string entry", lambda t, c: create_optimizer(make_tiny_llama(), target_modules=["q_proj", 3]),
     TypeError, r"`target_modules` entries must be strings"),
    ("optimizer", "targets that match nothing", lambda t, c: create_optimizer(make_tiny_llama(), target_modules="x"),
     ValueError, r"`target_modules`='x' matched no Linear/Conv1D module\. Such modules are named like: 'model\.layers"),
    ("optimizer", "lr as a string", lambda t, c: create_optimizer(make_tiny_llama(), lr="1e-3"), TypeError,
     r"`lr` must be a number, got str '1e-3' \(write it without quotes"),
    ("optimizer", "betas as a number", lambda t, c: create_optimizer(make_tiny_llama(), betas=0.9), TypeError,
     r"`betas` must be two numbers"),
    ("optimizer", "rank 0", lambda t, c: create_optimizer(make_tiny_llama(), rank=0), ValueError,
     r"`rank` must be an int >= 1"),
    ("optimizer", "misspelt option", lambda t, c: create_optimizer(make_tiny_llama(), rnak=8), ValueError,
     r"Unknown option\(s\) \['rnak'\] for mode 'galore'\. Valid options: .*rank"),
    ("optimizer", "an option the projector lacks", lambda t, c: create_optimizer(make_tiny_llama(), "galore_dct",
                                                                               seed=1), ValueError,
     r"Unknown option\(s\) \['seed'\] for mode 'galore_dct'"),
    ("optimizer", "unknown refresh policy", lambda t, c: create_optimizer(make_tiny_llama(), refresh="sometimes"),
     ValueError, r"`refresh`='sometimes'; use one of \['fixed', 'lazy'\]"),
    ("optimizer", "cosine threshold above 1", lambda t, c: create_optimizer(make_tiny_llama(), cos_threshold=2),
     ValueError, r"`cos_threshold` must be in \[0, 1\]"),
    ("optimizer", "unknown non-finite policy", lambda t, c: create_optimizer(make_tiny_llama(), nonfinite="ignore"),
     ValueError, r"`nonfinite`='ignore'; use one of"),
    ("optimizer", "gradient_accumulation_steps without layer-wise",
     lambda t, c: create_optimizer(make_tiny_llama(), gradient_accumulation_steps=2), ValueError,
     r"`gradient_accumulation_steps` is a layer-wise option \(layerwise=True\)"),
    ("optimizer", "a GaLore checkpoint into FRUGAL", lambda t, c: load_into("frugal"), ValueError,
     r"saved with other optimizer settings: .*moment_policy: saved 'keep', requested 'reset'.*adopt_saved_settings=True"),
    ("optimizer", "a rank-8 checkpoint into rank 4", lambda t, c: load_into("galore", rank=4), ValueError,
     r"group 1 rank: saved 8, requested 4"),
    ("optimizer", "a GaLore checkpoint into the DCT mode", lambda t, c: load_into("galore_dct", rank=8), ValueError,
     r"group 1 projector: saved 'svd', requested 'dct'"),
    ("optimizer", "a GaLore checkpoint into AdamW", lambda t, c: load_into("adamw"), ValueError,
     r"parameter groups \['plain \(7 params\)', 'projected \(14 params\)'\] do not match .*another mode"),
    ("q_galore", "q_galore on an unprepared model", lambda t, c: create_optimizer(make_tiny_llama(), "q_galore"),
     ValueError, r"Call hf_lowrank\.prepare_model_for_qgalore\(model\)"),
    ("q_galore", "a group size that does not divide in_features", lambda t, c: qgalore(group_size=48), ValueError,
     r"`group_size`=48 does not divide the input dimension 64 of 'model\.layers\.0\.self_attn\.q_proj'.*e\.g\. \[32, 64\]"),
    ("q_galore", "3-bit weights", lambda t, c: qgalore(weight_bits=3), ValueError,
     r"`weight_bits`=3 is not supported; use one of \[4, 8\]"),
    ("q_galore", "a norm as target", lambda t, c: qgalore(target_modules=["norm"]), ValueError,
     r"entry 'norm' matches \['LlamaRMSNorm'\] module\(s\).*but no Linear"),
    ("q_galore", "a dense checkpoint into a prepared model",
     lambda t, c: prepared().load_state_dict(make_tiny_llama().state_dict(), strict=False), RuntimeError,
     r"dense weight was given to a QuantLinear; load dense checkpoints before prepare_model_for_qgalore"),
    ("tuners", "WeLore without a target reduction", lambda t, c: welore(), ValueError, r"exactly one"),
    ("tuners", "WeLore targets that match nothing", lambda t, c: welore(rank_reduction=0.5, target_modules=["nope"]),
     ValueError, r"`target_modules`=\['nope'\] matched no Linear/Conv1D module"),
    ("tuners", "GradNormLoRP with an unknown projector", lambda t, c: gradnormlorp(projector="pca"), ValueError,
     r"`projector`='pca' is unknown; available"),
    ("tuners", "pickle serialization of a tuner", lambda t, c: tuner_save(t), ValueError,
     r"Tuners save safetensors only; drop `safe_serialization=False`"),
    ("tuners", "loading a folder that holds no tuner", lambda t, c: load_tuner_from(t), FileNotFoundError,
     r"No hf_lowrank_config\.json in .*save_pretrained"),
    ("loops", "tpSGD with an unknown local loss", lambda t, c: tpsgd_config(local_loss="hinge"), ValueError,
     r"local_loss='hinge'.*mse, l1, bce, cross_entropy"),
    ("loops", "tpSGD on a non-Sequential network", lambda t, c: tpsgd_model(nn.Linear(4, 2)), TypeError,
     r"nn\.Sequential"),
    ("loops", "CUBER with an unknown strategy", lambda t, c: continual_config(strategy="nope"), ValueError,
     r"`strategy`='nope' is not supported; use one of"),
    ("recipes", "unknown model size", lambda t, c: recipe("model_size=3b"), ValueError,
     r"Unknown model_size '3b'\. Valid sizes: tiny"),
    ("recipes", "unknown mode", lambda t, c: recipe("mode=galor"), ValueError,
     r"Unknown mode 'galor'\. Valid modes: .*q_galore"),
    ("recipes", "misspelt config key", lambda t, c: recipe("lerning_rate=1e-3"), ValueError,
     r"Unknown config key `lerning_rate`"),
    ("cli", "a config file that does not exist", lambda t, c: cli_error(c, "train", "/nonexistent.yaml"), ValueError,
     r"^hf-lowrank: error: .*does not exist"),
    ("cli", "push a card without a repo id", lambda t, c: cli_error(c, "card", "x.json", "--push"), ValueError,
     r"^hf-lowrank: error: .*--push needs --repo-id"),
]


@pytest.mark.parametrize("area, what, call, error, message", BAD_INPUTS, ids=[f"{a}: {w}" for a, w, *_ in BAD_INPUTS])
def test_bad_input_gets_a_clear_error(tmp_path, capsys, area, what, call, error, message):
    with pytest.raises(error, match=message):
        call(tmp_path, capsys)


def test_the_table_covers_every_area_with_at_least_30_inputs():
    assert len(BAD_INPUTS) >= 30
    assert {a for a, *_ in BAD_INPUTS} == {"optimizer", "q_galore", "tuners", "loops", "recipes", "cli"}


def test_a_target_entry_that_selects_nothing_warns_naming_it():
    with pytest.warns(UserWarning, match=r"entry 'embed_tokens' matches \['Embedding'\].*selects nothing"):
        create_optimizer(make_tiny_llama(), target_modules=["embed_tokens", "q_proj"], rank=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # containers ("mlp") hold linear layers: no warning
        create_optimizer(make_tiny_llama(), target_modules=["attn", "mlp"], rank=8)


# --- item 1: GPT-2's Conv1D ---------------------------------------------------------------------------------
def test_gpt2_conv1d_weights_are_projected():
    model = tiny_gpt2()
    optimizer = create_optimizer(model, "galore", rank=8)
    projected = next(g for g in optimizer.param_groups if "rank" in g)["param_names"]
    assert len(projected) == 8 and all(n.split(".")[-2] in ("c_attn", "c_proj", "c_fc") for n in projected)
    assert "lm_head.weight" not in projected and "transformer.wte.weight" not in projected  # tied head: unprojected
    named = create_optimizer(model, "galore", rank=8, target_modules=["c_attn", "c_fc"])
    assert len(next(g for g in named.param_groups if "rank" in g)["params"]) == 4
    ids = torch.randint(0, 128, (2, 16))
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    state = optimizer.state[model.transformer.h[0].attn.c_attn.weight]
    assert state["exp_avg"].numel() < before.numel() and not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)


def test_welore_compresses_gpt2_conv1d_and_merges_back_to_conv1d():
    from transformers.pytorch_utils import Conv1D

    from hf_lowrank.welore import WeLoreConfig, WeLoreLinear, compress

    model = tiny_gpt2().eval()  # no dropout: the logits are compared
    ids = torch.randint(0, 128, (2, 16))
    tuner = compress(model, WeLoreConfig(rank_reduction=0.5, target_modules="all-linear"))
    assert tuner.num_targeted == 8 and any(isinstance(m, WeLoreLinear) for m in model.modules())
    with torch.no_grad():
        compressed = model(input_ids=ids).logits
    merged = tuner.merge_and_unload()
    assert all(isinstance(merged.transformer.h[i].attn.c_attn, Conv1D) for i in range(2))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, compressed, rtol=1e-4, atol=1e-4)


# --- item 3: a rank that projects nothing ------------------------------------------------------------------
def test_a_rank_at_least_the_dimension_gets_the_plain_update_and_never_more_state_than_adamw():
    model = make_tiny_llama()  # hidden 64, intermediate 128: rank 128 projects nothing
    galore = create_optimizer(model, "galore", rank=128)
    assert not any("rank" in g for g in galore.param_groups)
    adamw = create_optimizer(model, "adamw")
    for optimizer in (galore, adamw):
        optimizer.init_state()
    assert optimizer_state_bytes(galore) <= optimizer_state_bytes(adamw)
    mixed = create_optimizer(model, "galore", rank=64)  # q/k/v/o (64 x 64) plain, MLP (64 x 128, 128 x 64) too
    assert not any("rank" in g for g in mixed.param_groups)
    partial = create_optimizer(make_tiny_llama(hidden=128, intermediate=256, heads=4), "galore", rank=100)
    assert {n.split(".")[-2] for n in next(g for g in partial.param_groups if "rank" in g)["param_names"]} == {
        "gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"}


# --- item 6: one meaning of all-linear ------------------------------------------------------------------------
def test_all_linear_means_the_same_layers_for_every_method():
    from hf_lowrank.gradnormlorp import GradNormLoRPConfig, GradNormLoRPModel
    from hf_lowrank.utils.targets import find_target_linears
    from hf_lowrank.welore import WeLoreConfig, WeLoreModel

    expected = {n for n, m in make_tiny_llama().named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    optimizer = create_optimizer(make_tiny_llama(), "galore", rank=8)
    projected = {n.rsplit(".", 1)[0] for n in next(g for g in optimizer.param_groups if "rank" in g)["param_names"]}
    welore = {n for n, _ in WeLoreModel(make_tiny_llama(), WeLoreConfig(rank_reduction=0.5))._targets()}
    gnl = set(GradNormLoRPModel(make_tiny_llama(), GradNormLoRPConfig()).reparameterize().targets)
    assert projected == welore == gnl == expected
    assert {n for n, _ in find_target_linears(make_tiny_llama(), ["lm_head"])} == {"lm_head"}  # named: targeted


# --- item 8: errors are not masked ------------------------------------------------------------------------------
def test_an_error_inside_a_projector_is_not_reported_as_an_unsupported_option(monkeypatch):
    from hf_lowrank.projectors import SVDProjector, get_projector

    def broken_init(self, *args, **kwargs):
        raise TypeError("a bug inside the projector")

    monkeypatch.setattr(SVDProjector, "__init__", broken_init)
    with pytest.raises(TypeError, match="a bug inside the projector"):
        get_projector("svd", (4, 4), 2)


def test_tuner_save_takes_the_state_dict_trainer_passes(tmp_path):
    from safetensors.torch import load_file

    from hf_lowrank.welore import WeLoreConfig, compress

    tuner = compress(make_tiny_llama(), WeLoreConfig(rank_reduction=0.5))
    state = {f"model.{k}": torch.zeros_like(v) for k, v in tuner.tuner_state_dict().items()}
    tuner.save_pretrained(str(tmp_path / "gathered"), state_dict=state)
    saved = load_file(tmp_path / "gathered" / "model.safetensors")
    assert saved and all(torch.count_nonzero(v) == 0 for v in saved.values())
    tuner.save_pretrained(str(tmp_path / "other-rank"), is_main_process=False)
    assert not (tmp_path / "other-rank").exists()
    with pytest.raises(TypeError):
        tuner.save_pretrained(str(tmp_path), push_to_hub=True)
