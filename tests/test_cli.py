"""`hf-lowrank` CLI: train / eval / compare / card / env, and clean errors for bad input."""
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from hf_lowrank import cli


ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "configs" / "pretrain" / "tiny_galore.yaml"
ACCELERATE = ROOT / "recipes" / "accelerate"
FAST = ["max_steps=3", "batch_size=2", "max_seq_length=16", "eval_batches=1", "eval_batch_size=2", "rank=4",
        "model_config.num_hidden_layers=1", "model_config.hidden_size=32", "model_config.intermediate_size=64",
        "progress=false"]


def test_train_runs_the_recipe_named_in_the_yaml(tmp_path):
    assert cli.main(["train", str(TINY), f"results_dir={tmp_path}", *FAST]) == 0
    record = json.loads((tmp_path / "tinyshakespeare--galore--3steps--tiny.json").read_text())
    assert record["train_info"]["steps"] == 3 and record["run_info"]["config"]["rank"] == 4
    assert record["meta_info"]["system"]["world_size"] == 1
    assert record["run_info"]["command"].startswith(
        "accelerate launch recipes/pretrain.py --config ./recipes/configs/pretrain/tiny_galore.yaml "
        f"results_dir={tmp_path.name} max_steps=3")
    text = (tmp_path / "tinyshakespeare--galore--3steps--tiny.json").read_text()
    assert str(tmp_path) not in text and str(ROOT) not in text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiprocess
def test_accelerate_launcher_runs_two_cpu_processes(tmp_path, monkeypatch):
    """`--launcher accelerate --num-processes 2` really starts two data-parallel workers on a machine without GPU."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch = ["--launcher", "accelerate", "--accelerate-config", str(ACCELERATE / "cpu.yaml"), "--num-processes", "2",
              "--main-process-port", str(_free_port())]
    code = cli.main(["train", str(TINY), *launch, f"results_dir={tmp_path}", *FAST])
    assert code == 0
    (path,) = tmp_path.glob("*.json")  # only the main process writes results
    record = json.loads(path.read_text())
    assert path.name == "tinyshakespeare--galore--3steps--tiny.json"
    assert record["meta_info"]["system"]["world_size"] == 2 and not record["meta_info"]["system"]["cuda"]
    assert record["train_info"]["steps"] == 3 and record["train_info"]["metrics"]["perplexity"] > 1
    assert record["run_info"]["config"]["rank"] == 4
    launch = "accelerate launch --multi_gpu --num_processes 2 recipes/pretrain.py"  # not the single-process command
    assert record["run_info"]["command"].startswith(launch)


def test_accelerate_command_line(tmp_path):
    script = ROOT / "recipes" / "pretrain.py"
    command = cli.accelerate_command(script, ["--config", "x.yaml"], str(ACCELERATE / "cpu.yaml"), 2, 29999)
    launch = command[command.index("accelerate.commands.launch") + 1: command.index(str(script))]
    assert launch == ["--config_file", str(ACCELERATE / "cpu.yaml"), "--num_processes", "2", "--multi_gpu",
                      "--main_process_port", "29999"]
    assert command[command.index(str(script)) + 1:] == ["--config", "x.yaml"]
    assert "--multi_gpu" not in cli.accelerate_command(script, [], num_processes=1)


SHIPPED_ACCELERATE = {"cpu.yaml": ("NO", 1), "single_gpu.yaml": ("NO", 1), "multi_gpu.yaml": ("MULTI_GPU", 8),
                      "fsdp.yaml": ("FSDP", 8)}


@pytest.mark.parametrize("name", sorted(SHIPPED_ACCELERATE))
def test_shipped_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    assert {p.name for p in ACCELERATE.glob("*.yaml")} == set(SHIPPED_ACCELERATE)
    path = ACCELERATE / name
    config = load_config_from_file(str(path))  # ClusterConfig(**yaml): an unknown top-level key raises
    assert (config.distributed_type.value, config.num_processes) == SHIPPED_ACCELERATE[name]
    launch_options = {action.dest for action in launch_command_parser()._actions}
    assert set(config.fsdp_config) <= launch_options  # accelerate silently ignores misspelt fsdp keys
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    referenced = re.findall(r"recipes/[\w./-]+\.(?:py|yaml)", header)
    assert referenced and all((ROOT / ref).is_file() for ref in referenced), referenced


def test_eval_skips_training_and_copied_configs_find_their_recipe(tmp_path, monkeypatch):
    copied = tmp_path / "my_experiment_galore.yaml"
    shutil.copy(TINY, copied)  # a config outside recipes/ still finds recipes/pretrain.py
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", str(copied), "mode=adamw", "results_dir=res", *FAST]) == 0
    record = json.loads((tmp_path / "res" / "tinyshakespeare--zeroshot--my_experiment.json").read_text())
    assert record["run_info"]["config"]["do_train"] is False and record["train_info"]["steps"] == 0


@pytest.mark.parametrize("args, message", [
    (["train", str(TINY), "bogus_key=1"], "Unknown config key `bogus_key`"),
    (["train", str(TINY), "mode=nope"], "Unknown mode 'nope'"),
    (["train", "/nonexistent.yaml"], "does not exist"),
    (["compare", str(TINY), "--modes", "adamw,nope"], "Unknown mode 'nope'"),
    (["card", "/nonexistent.json"], "does not exist"),
    (["card", "x.json", "--push"], "--push needs --repo-id"),
    (["train", str(TINY), "--num-processes", "2"], "need --launcher accelerate"),
    (["train", str(TINY), "--launcher", "accelerate", "--accelerate-config", "/nonexistent.yaml"], "does not exist"),
])
def test_errors_are_one_line_messages(args, message, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-lowrank: error:") and message in err and "Traceback" not in err


def test_unexpected_runtime_errors_keep_their_traceback(monkeypatch):
    """An out-of-memory error (or any bug) is not squashed into a one-line 'configuration' message."""
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "run_recipe", out_of_memory)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        cli.main(["train", str(TINY)])


def test_compare_reports_failed_modes_in_one_line(tmp_path, monkeypatch, capsys):
    failed = subprocess.CompletedProcess(args=[], returncode=1)
    monkeypatch.setattr(cli.subprocess, "run", lambda *args, **kwargs: failed)
    assert cli.main(["compare", str(TINY), "--modes", "adamw", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("hf-lowrank: error: Modes that failed: adamw") and "Traceback" not in err


def test_yaml_without_recipe_key(tmp_path, capsys):
    (tmp_path / "x.yaml").write_text("lr: 1e-3\n")
    assert cli.main(["train", str(tmp_path / "x.yaml")]) == 2
    assert "has no `recipe:` key" in capsys.readouterr().err


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """One `compare` run (two modes, each in its own process) shared by the tests below."""
    out = tmp_path_factory.mktemp("compare")
    code = cli.main(["compare", str(TINY), "--modes", "adamw,galore", "--results-dir", str(out), *FAST])
    return code, out


def test_compare_writes_table_and_plot(compared):
    code, out = compared
    assert code == 0
    table = (out / "tinyshakespeare--compare--tiny.md").read_text()
    assert "| tinyshakespeare | adamw | tiny |" in table and "| tinyshakespeare | galore | tiny |" in table
    assert "step time / adamw" in table
    assert (out / "tinyshakespeare--compare--tiny.png").read_bytes()[:4] == b"\x89PNG"
    # The adamw arm used its own sibling config (tiny_adamw.yaml: lr 1e-3), the galore arm tiny_galore.yaml (1e-2).
    lrs = {m: json.loads((out / f"tinyshakespeare--{m}--3steps--tiny.json").read_text())["run_info"]["config"]["lr"]
           for m in ("adamw", "galore")}
    assert lrs == {"adamw": 1e-3, "galore": 1e-2}


def test_card_and_env(compared, tmp_path, capsys):
    results = compared[1] / "tinyshakespeare--galore--3steps--tiny.json"
    capsys.readouterr()
    assert cli.main(["card", str(results), "--repo-id", "me/tiny-galore"]) == 0
    out = capsys.readouterr().out
    assert "model-index:" in out and "name: me/tiny-galore" in out and "perplexity" in out
    assert cli.main(["card", str(results), "--output", str(tmp_path / "README.md")]) == 0
    assert (tmp_path / "README.md").read_text().startswith("---\n")
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "galore" in out and "torch_threads" in out
