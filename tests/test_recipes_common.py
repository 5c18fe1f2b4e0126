"""recipes/common.py: config loading and overrides, mode checks, results JSON schema, tables and plots."""
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import common  # noqa: E402


@dataclass
class DemoConfig(common.RecipeConfig):
    task: str = field(default="sst2", metadata={"help": "task"})
    num_fewshot: int = field(default=5, metadata={"help": "recipe-specific key"})


def write_yaml(tmp_path, text, name="minilm_galore.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_values_and_overrides_are_coerced(tmp_path):
    path = write_yaml(tmp_path, "recipe: glue\nmode: galore\nlr: 1e-4\nmax_steps: 10\nrank: 8\n")
    cfg = common.load_config(
        DemoConfig, path,
        ["lr=2e-5", "max_steps=1e2", "do_train=false", "target_modules=[query,value]", "scale=2",
         "mode_options.moment_policy=rotate", "max_train_samples=none", "num_fewshot=0"],
    )
    assert cfg.lr == pytest.approx(2e-5) and isinstance(cfg.lr, float)  # PyYAML reads "2e-5" as a string
    assert cfg.max_steps == 100 and isinstance(cfg.max_steps, int)
    assert cfg.do_train is False
    assert cfg.target_modules == ["query", "value"]
    assert cfg.scale == 2.0 and isinstance(cfg.scale, float)
    assert cfg.mode_options == {"moment_policy": "rotate"}
    assert cfg.max_train_samples is None and cfg.num_fewshot == 0
    assert cfg.config_name == "minilm"  # "<model>_<mode>" stem without the mode
    assert cfg.run_name == "sst2--zeroshot--minilm"  # do_train=false: nothing trained
    assert cfg.output_dir == "outputs/sst2--zeroshot--minilm"
    assert "lr=2e-5" in cfg.command and "--config minilm_galore.yaml" in cfg.command


def test_result_names_never_collide():
    """Runs that differ in task, mode, step budget, training or config get different results files."""
    runs = [["task=sst2"], ["task=rte"], ["mode=galore"], ["max_steps=100"], ["max_steps=200"], ["num_train_epochs=3"],
            ["do_train=false"], ["do_train=false", "config_name=other"], ["config_name=other"]]
    names = [common.load_config(DemoConfig, None, ["config_name=minilm", *run]).run_name for run in runs]
    assert len(set(names)) == len(names), names
    assert names[3] == "sst2--adamw--100steps--minilm" and names[5] == "sst2--adamw--3epochs--minilm"
    assert names[6] == "sst2--zeroshot--minilm"  # evaluation only is labelled as such, not as an optimizer


def test_explicit_run_name_names_results_and_output_dir(tmp_path):
    cfg = common.load_config(DemoConfig, None, ["run_name=seed1", f"results_dir={tmp_path}"])
    assert (cfg.run_name, cfg.output_dir, common.results_path(cfg)) == ("seed1", "outputs/seed1", tmp_path / "seed1.json")
    cfg = common.load_config(DemoConfig, None, ["output_dir=out/{task}/{run_name}", "max_steps=5"])
    assert cfg.output_dir == "out/sst2/sst2--adamw--5steps--default"  # no YAML, no task given: config "default"

    @dataclass
    class TaskSetConfig(DemoConfig):
        tasks: str = "boolq,piqa"

        def run_name_parts(self):
            return [*super().run_name_parts(), self.tasks.replace(",", "+")]

    assert common.load_config(TaskSetConfig, None, ["max_steps=5"]).run_name == "sst2--adamw--5steps--default--boolq+piqa"
    with pytest.raises(ValueError, match="`run_name` names a file in results_dir and cannot hold '/'"):
        common.load_config(DemoConfig, None, ["run_name=a/b"])
    with pytest.raises(ValueError, match=r"`output_dir` 'out/\{seed\}' does not expand.*\{run_name\}"):
        common.load_config(DemoConfig, None, ["output_dir=out/{seed}"])


def test_unknown_key_lists_valid_keys_and_suggests(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown config key `lerning_rate`.*Valid keys: .*batch_size.*num_fewshot"):
        common.load_config(DemoConfig, None, ["lerning_rate=1e-3"])
    with pytest.raises(ValueError, match=r"Did you mean `rank`"):
        common.load_config(DemoConfig, write_yaml(tmp_path, "rnak: 4\n"))


@pytest.mark.parametrize("override, message", [
    ("max_steps=ten", "`max_steps` expects int"),
    ("max_steps=2.5", "`max_steps` expects int"),
    ("do_train=maybe", "`do_train` expects bool"),
    ("lr=-1", "`lr` must be > 0"),
    ("max_steps=0", "`max_steps` must be"),
    ("lr", "not of the form key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        common.load_config(DemoConfig, None, [override])


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        common.load_config(DemoConfig, tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="must hold a mapping"):
        common.load_config(DemoConfig, write_yaml(tmp_path, "- a\n- b\n"))


def test_task_overrides_apply_unless_given_on_the_command_line(tmp_path):
    path = write_yaml(tmp_path, "lr: 2e-5\ntask_overrides:\n  mrpc: {lr: 3e-5, batch_size: 32}\n")
    assert common.load_config(DemoConfig, path).lr == pytest.approx(2e-5)
    cfg = common.load_config(DemoConfig, path, ["task=mrpc"])
    assert (cfg.lr, cfg.batch_size) == (pytest.approx(3e-5), 32)
    cfg = common.load_config(DemoConfig, path, ["task=mrpc", "lr=1e-5"])
    assert (cfg.lr, cfg.batch_size) == (pytest.approx(1e-5), 32)


def test_parse_args_checks_recipe_name(tmp_path):
    path = write_yaml(tmp_path, "recipe: pretrain\n")
    with pytest.raises(ValueError, match="for recipe `pretrain`, not `glue`"):
        common.parse_args(DemoConfig, ["--config", str(path)], recipe="glue")
    assert common.parse_args(DemoConfig, ["lr=1e-3"], recipe="glue").recipe == "glue"


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match=r"Unknown mode 'galor'\. Valid modes: .*adamw.*galore.*lora"):
        common.check_mode("galor")
    common.check_mode("lora")


def fake_record(tmp_path, mode, metric, step, state_bytes):
    cfg = common.load_config(DemoConfig, None, [f"mode={mode}", "config_name=minilm", f"results_dir={tmp_path}"])
    meter = common.RunMeter()
    meter.step_times, meter.losses, meter.peak_bytes = [step] * 3, [(1, 0.7)], 2**20
    return common.write_results(cfg, {"accuracy": metric}, meter=meter, main_metric="accuracy",
                                examples_per_step=16, extra={"optimizer_state_bytes": state_bytes})


def test_results_json_schema_table_and_plot(tmp_path):
    from importlib import metadata

    path = fake_record(tmp_path, "adamw", 0.8, 0.5, 4 * 2**20)
    assert path.name == "sst2--adamw--1epochs--minilm.json"
    record = json.loads(path.read_text())
    common.validate_results(record)
    assert set(record) == {"run_info", "train_info", "meta_info"}
    info = record["train_info"]
    assert info["metrics"] == {"accuracy": 0.8} and info["step_time_median_s"] == 0.5
    assert info["train_samples_per_s"] == pytest.approx(32.0) and info["peak_memory_bytes"] == 2**20
    assert record["meta_info"]["versions"]["torch"] == metadata.version("torch")
    assert record["run_info"]["config"]["mode"] == "adamw" and record["run_info"]["status"] == "ok"

    fake_record(tmp_path, "galore", 0.79, 0.6, 2**20)
    records = common.load_results(tmp_path)
    table = common.results_table(records)
    lines = table.splitlines()
    assert lines[0].startswith("| task | mode | config | accuracy | optimizer state (MB) | step time / adamw")
    adamw_row, galore_row = lines[2], lines[3]
    assert "| adamw |" in adamw_row and "| 80.00 | 4.0 | 1.00 |" in adamw_row
    assert "| galore |" in galore_row and "| 79.00 | 1.0 | 1.20 |" in galore_row
    png = common.plot_results(records, tmp_path / "plot.png")
    assert png.read_bytes()[:4] == b"\x89PNG"

    broken = dict(record)
    del broken["meta_info"]
    with pytest.raises(ValueError, match="meta_info"):
        common.validate_results(broken)


def test_results_record_counts_params_and_optimizer_state(tiny_llama):
    import torch

    from hf_lowrank.optim import optimizer_state_bytes

    cfg = common.load_config(DemoConfig, None, ["mode=adamw"])
    model, (factory, kwargs) = common.build_optimizer(tiny_llama, cfg)
    optimizer = factory()(model, **kwargs)  # what Trainer does with optimizer_cls_and_kwargs
    tiny_llama(input_ids=torch.randint(0, 256, (2, 8))).logits.sum().backward()
    optimizer.step()
    record = common.build_results(cfg, {"x": 1.0}, model=model, optimizer=optimizer)
    total = sum(p.numel() for p in tiny_llama.parameters())
    assert record["train_info"]["trainable_params"] == record["train_info"]["total_params"] == total
    assert record["train_info"]["optimizer_state_bytes"] == optimizer_state_bytes(optimizer) >= 2 * 4 * total


def test_lora_arm_freezes_the_base_model(tiny_llama):
    cfg = common.load_config(DemoConfig, None, ["mode=lora", "lora_r=4", "target_modules=[q_proj,v_proj]"])
    model, (factory, kwargs) = common.build_optimizer(tiny_llama, cfg, task_type="CAUSAL_LM")
    optimizer = factory()(model, **kwargs)
    trainable, total = common.count_parameters(model)
    layers, hidden = 2, 64
    assert trainable == layers * 2 * (4 * hidden + hidden * 4)  # A (r×in) + B (out×r) on q and v
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == trainable < total


def test_run_script_tears_the_process_group_down_after_main():
    """A launched recipe leaves no live process group behind (a live gloo group can abort the worker at exit)."""
    import torch.distributed as dist

    calls = []
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        common.run_script(lambda: calls.append("main"))
        assert calls == ["main"]
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_run_script_without_a_process_group_just_runs_main():
    calls = []
    common.run_script(lambda: calls.append("main"))
    assert calls == ["main"]


def test_a_failed_run_writes_an_error_record_over_the_old_one_and_reraises(tmp_path):
    cfg = common.load_config(DemoConfig, None, ["config_name=minilm", f"results_dir={tmp_path}"])
    common.write_results(cfg, {"accuracy": 0.9})  # an earlier successful run of the same config
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with common.recording_errors(cfg):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    record = json.loads(common.results_path(cfg).read_text())
    common.validate_results(record)
    assert record["run_info"]["status"] == "error" and record["train_info"]["metrics"] == {}
    assert record["run_info"]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert "| sst2 | adamw (error) | minilm |" in common.results_table(common.load_results(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["sst2--adamw--1epochs--minilm.json"]  # no partial files left


def test_error_record_names_the_failing_process(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    cfg = common.load_config(DemoConfig, None, [f"results_dir={tmp_path}"])
    with pytest.raises(ValueError):
        with common.recording_errors(cfg):
            raise ValueError("boom")
    assert json.loads(common.results_path(cfg).read_text())["run_info"]["error"] == "ValueError: boom (process 1 of 2)"


@pytest.mark.parametrize("recipe", ["pretrain", "glue", "mmlu", "commonsense"])
def test_every_recipe_records_its_failure(recipe, tmp_path, monkeypatch):
    """The failure is injected at the first step of each recipe's body, before any data or model is loaded."""
    import importlib

    module = importlib.import_module(recipe)

    def fail(mode):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(module.common, "check_mode", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        module.main([f"results_dir={tmp_path}", "progress=false"])
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["run_info"]["recipe"] == recipe and record["run_info"]["status"] == "error"
    assert record["run_info"]["error"] == "RuntimeError: injected failure"


def test_pretrain_records_a_failure_during_training(tmp_path, monkeypatch):
    from transformers import Trainer

    import pretrain

    def out_of_memory(self, *args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(Trainer, "train", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        pretrain.main([f"results_dir={tmp_path}", "max_steps=2", "batch_size=2", "max_seq_length=16",
                       "eval_batches=1", "eval_batch_size=2", "model_config.num_hidden_layers=1", "progress=false"])
    (path,) = tmp_path.glob("*.json")
    record = json.loads(path.read_text())
    assert record["run_info"]["status"] == "error" and "CUDA out of memory" in record["run_info"]["error"]


def test_results_and_command_store_no_absolute_paths(tmp_path):
    """Paths under the repository are stored relative to it, others by their name: no machine's layout is kept."""
    repo = Path(common.__file__).resolve().parents[1]
    path = write_yaml(tmp_path, "recipe: glue\nmode: galore\n")
    cfg = common.load_config(DemoConfig, path, [
        f"results_dir={tmp_path / 'results'}", f"output_dir={tmp_path / 'out'}",
        f"data_files.train={tmp_path / 'train.jsonl'}", f"model_name_or_path={repo / 'outputs' / 'ckpt'}",
        "target_modules=[query,value]",
    ])
    assert cfg.results_dir == str(tmp_path / "results")  # the run itself uses the real paths
    text = common.write_results(cfg, {"accuracy": 0.5}).read_text()
    assert str(tmp_path) not in text and str(repo) not in text
    run = json.loads(text)["run_info"]
    config = run["config"]
    assert (config["results_dir"], config["output_dir"], config["config_path"]) == ("results", "out", path.name)
    assert config["data_files"] == {"train": "train.jsonl"} and config["model_name_or_path"] == "./outputs/ckpt"
    assert run["command"] == config["command"] == (
        "accelerate launch recipes/glue.py --config minilm_galore.yaml results_dir=results output_dir=out "
        "data_files.train=train.jsonl model_name_or_path=./outputs/ckpt 'target_modules=[query,value]'")
    assert common.portable_path("recipes/configs/glue/minilm_galore.yaml") == "recipes/configs/glue/minilm_galore.yaml"
    assert common.portable_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_recipe_default_names_the_script_in_the_command():
    @dataclass
    class GlueLike(common.RecipeConfig):
        recipe: str = "glue"

    assert common.load_config(GlueLike, None, ["lr=1e-3"]).command == "accelerate launch recipes/glue.py lr=1e-3"


@pytest.mark.parametrize("env, launch", [
    ({}, "accelerate launch"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, "torchrun --nproc_per_node 4"),
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}, "torchrun --nnodes 2 --nproc_per_node 4"),
    ({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "ACCELERATE_MIXED_PRECISION": "no"},
     "accelerate launch --multi_gpu --num_processes 2"),
    ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "ACCELERATE_MIXED_PRECISION": "bf16",
      "ACCELERATE_USE_FSDP": "true"}, "accelerate launch --use_fsdp --num_processes 16 --num_machines 2"),
])
def test_reproduce_command_records_the_multi_process_launch(env, launch, monkeypatch):
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = common.load_config(DemoConfig, None, ["recipe=glue", "max_steps=5"])
    assert cfg.command == f"{launch} recipes/glue.py recipe=glue max_steps=5"


def test_saved_card_and_results_keep_no_absolute_paths(tmp_path, tiny_llama):
    from huggingface_hub import ModelCard

    from hf_lowrank import hub

    cfg = common.load_config(DemoConfig, None, [
        "recipe=pretrain", f"results_dir={tmp_path / 'results'}", f"output_dir={tmp_path / 'out'}",
        f"data_files.train={tmp_path / 'train.txt'}", "max_steps=5",
    ])
    meter = common.RunMeter()
    meter.step_times = [0.1] * 5
    path = common.write_results(cfg, {"perplexity": 9.0}, meter=meter, main_metric="perplexity")
    out = hub.save_pretrained(tiny_llama, cfg.output_dir, results=path)
    for text in ((out / "README.md").read_text(), (out / hub.RESULTS_FILE).read_text()):
        assert str(tmp_path) not in text and str(common.REPO_DIR) not in text
    card = ModelCard.load(out / "README.md")
    assert "**Smoke run:** 5 optimizer steps" in card.text
    assert "accelerate launch recipes/pretrain.py recipe=pretrain results_dir=results output_dir=out" in card.text


@pytest.mark.parametrize("mode", ["gradnormlorp", "welore"])
def test_tuner_arms_train_their_parameters_and_the_task_head(mode):
    """mode=gradnormlorp / mode=welore: the tuner changes the model in place; its optimizer holds exactly what is
    left trainable, the new classification head included."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=2))
    cfg = common.load_config(DemoConfig, None, [f"mode={mode}", "rank=4", "target_modules=[query,value]"])
    model, spec = common.build_optimizer(model, cfg, task_type="SEQ_CLS")
    optimizer = common.make_optimizer(model, spec)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert stepped == {id(p) for p in model.parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable and "bert.embeddings.word_embeddings.weight" not in trainable
    suffix = {"gradnormlorp": "query.parametrizations.weight.original1", "welore": ".welore_U"}[mode]  # WeLore factorises the matrices it cuts by half or more
    assert any(n.endswith(suffix) for n in trainable), sorted(trainable)
    loss = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.tensor([0, 1])).loss
    loss.backward()
    optimizer.step()


def test_bitsandbytes_kernels_message_does_not_reach_users():
    """Importing the recipes, then transformers' Trainer and peft (both import bitsandbytes) prints no "kernels"
    warning: neither bitsandbytes' (online) nor `kernels`' skipped publisher check of bitsandbytes' repository
    (offline); other bitsandbytes and `kernels` messages still get through."""
    import logging
    import os
    import subprocess

    code = ("import sys; sys.path.insert(0, 'recipes'); import common; from transformers import Trainer; import peft; "
            "import logging; logging.getLogger('bitsandbytes.backends.cpu.ops').warning('other message'); "
            "logging.getLogger('kernels._internals.hf_hub').warning(\"Skipping publisher trust check for 'a/b'\")")
    run = subprocess.run([sys.executable, "-c", code], cwd=common.REPO_DIR, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert "kernels" not in run.stderr and "other message" in run.stderr, run.stderr
    assert "Skipping publisher trust check for 'a/b'" in run.stderr
    record = logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, "", 0,
                               "Failed to load CPU gemm_4bit_forward from kernels-community: %s.", ("x",), None)
    assert not logging.getLogger("bitsandbytes.backends.cpu.ops").filter(record)


def test_import_hf_lowrank_quiets_bitsandbytes_without_importing_torch():
    """``import hf_lowrank`` before transformers is enough to keep the "kernels" warnings away, and stays cheap."""
    import os
    import subprocess

    code = ("import sys, hf_lowrank; assert 'torch' not in sys.modules, 'import hf_lowrank imported torch'; "
            "from transformers import Trainer")
    run = subprocess.run([sys.executable, "-c", code], cwd=common.REPO_DIR, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert "kernels" not in run.stderr, run.stderr


QUIETING_IMPORTS = {"hf_lowrank", "common", "models"}  # each installs hf_lowrank's bitsandbytes log filters
NOISY_IMPORTS = {"transformers", "peft", "bitsandbytes", "trl"}  # each may import bitsandbytes


@pytest.mark.parametrize("script", sorted(str(p.relative_to(common.REPO_DIR)) for folder in ("recipes", "benchmarks")
                                          for p in (common.REPO_DIR / folder).glob("*.py")))
def test_scripts_import_hf_lowrank_before_transformers(script):
    """A recipe or benchmark that imports transformers (or peft) at module level before hf_lowrank would print
    bitsandbytes' import-time "kernels" warnings (the filters must be in place before bitsandbytes is imported)."""
    import ast

    quieted = False
    for node in ast.parse((common.REPO_DIR / script).read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            quieted = quieted or top in QUIETING_IMPORTS
            assert quieted or top not in NOISY_IMPORTS, f"{script}:{node.lineno} imports {name} before hf_lowrank"
