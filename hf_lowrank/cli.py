"""`hf-lowrank` command line: run recipes, compare optimizer modes, render model cards, report the environment.

    hf-lowrank train recipes/configs/glue/minilm_galore.yaml lr=5e-5      # one run (key=value overrides)
    hf-lowrank eval  recipes/configs/glue/minilm_adamw.yaml model_name_or_path=outputs/my-checkpoint
    hf-lowrank compare recipes/configs/glue/minilm_galore.yaml --modes adamw,galore,lora   # table + PNG
    hf-lowrank card results/sst2--galore--100steps--minilm.json --repo-id me/minilm-sst2-galore
    hf-lowrank env

A YAML config names its recipe (``recipe: glue``); the script ``<recipe>.py`` is found beside the ``configs`` folder
holding the YAML (``recipes/glue.py`` for ``recipes/configs/glue/*.yaml``) and runs in this process (imported from its
path), or under ``accelerate launch`` with ``--launcher accelerate``:

    hf-lowrank train recipes/configs/pretrain/llama-60m_galore.yaml --launcher accelerate \
        --accelerate-config recipes/accelerate/multi_gpu.yaml --num-processes 4
    hf-lowrank train recipes/configs/pretrain/tiny_galore.yaml --launcher accelerate --num-processes 2   # 2 CPU procs
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml


class CommandError(Exception):
    """A failure the CLI reports as one line (exit status 2), e.g. modes of `compare` that did not finish."""


def read_recipe_name(config: Path) -> str:
    if not config.is_file():
        raise FileNotFoundError(f"Config file {str(config)!r} does not exist.")
    data = yaml.safe_load(config.read_text()) or {}
    if not isinstance(data, dict) or not data.get("recipe"):
        raise ValueError(f"Config {str(config)!r} has no `recipe:` key naming its script (e.g. `recipe: glue`).")
    return str(data["recipe"])


def find_recipe_script(config: Path, recipe: str) -> Path:
    """`<recipe>.py` in the nearest ancestor of the YAML that holds recipes (the folder above ``configs/``), else in
    ``./recipes`` or the source checkout's ``recipes/`` (for a config copied elsewhere)."""
    candidates = [*config.resolve().parents, Path.cwd() / "recipes", Path(__file__).resolve().parents[1] / "recipes"]
    for folder in candidates:
        script = folder / f"{recipe}.py"
        if script.is_file() and (folder / "common.py").is_file():
            return script
    raise FileNotFoundError(
        f"No recipe script `{recipe}.py` found above {str(config)!r}, in ./recipes or beside hf_lowrank; "
        "recipes ship in the source checkout (recipes/<recipe>.py)."
    )


def accelerate_command(script: Path, argv: list[str], accelerate_config: Optional[str] = None,
                       num_processes: Optional[int] = None, main_process_port: Optional[int] = None) -> list[str]:
    """The ``accelerate launch`` command line running `script` with `argv`.

    Several processes on a machine without a GPU go through accelerate's multi-process (torchrun) launcher: its
    ``--cpu`` launcher starts a single process whatever ``--num_processes`` says. Each worker then picks the
    CPU/gloo backend itself, because the recipes' TrainingArguments set ``use_cpu`` when no GPU is present.
    """
    import torch

    if accelerate_config and not Path(accelerate_config).is_file():
        raise FileNotFoundError(f"accelerate config {accelerate_config!r} does not exist; shipped ones are in "
                                "recipes/accelerate/ (cpu.yaml, single_gpu.yaml, multi_gpu.yaml, fsdp.yaml).")
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        command += ["--config_file", str(accelerate_config)]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
        if num_processes > 1 and not torch.cuda.is_available():
            command.append("--multi_gpu")
    if main_process_port is not None:
        command += ["--main_process_port", str(main_process_port)]
    return [*command, str(script), *argv]


def run_recipe(config: Path, overrides: list[str], launcher: str = "python", accelerate_config: Optional[str] = None,
               num_processes: Optional[int] = None, main_process_port: Optional[int] = None):
    """Run the YAML's recipe with `overrides`; in-process (returns its metrics) or via `accelerate launch` (returns
    None; read the results JSON)."""
    script = find_recipe_script(config, read_recipe_name(config))
    argv = ["--config", str(config), *overrides]
    if launcher == "accelerate":
        subprocess.run(accelerate_command(script, argv, accelerate_config, num_processes, main_process_port),
                       check=True)
        return None
    if accelerate_config or num_processes is not None or main_process_port is not None:
        raise ValueError("--accelerate-config, --num-processes and --main-process-port need --launcher accelerate.")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *argv]
    name = f"hf_lowrank_recipes.{script.stem}"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclass type hints resolve through sys.modules
    try:
        spec.loader.exec_module(module)
        return module.main(argv)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        sys.modules.pop(name, None)


def _sibling_config(config: Path, mode: str) -> Optional[Path]:
    """`<model>_<mode>.yaml` next to `<model>_<other>.yaml`, carrying that mode's own hyper-parameters."""
    yaml_mode = (yaml.safe_load(config.read_text()) or {}).get("mode")
    if yaml_mode and config.stem.endswith(f"_{yaml_mode}"):
        sibling = config.with_name(f"{config.stem[: -len(yaml_mode)]}{mode}.yaml")
        if sibling.is_file():
            return sibling
    return None


def _config_name(config: Path) -> str:
    yaml_mode = (yaml.safe_load(config.read_text()) or {}).get("mode")
    stem = config.stem
    return stem[: -len(yaml_mode) - 1] if yaml_mode and stem.endswith(f"_{yaml_mode}") else stem


def _results_files(results_dir: str) -> dict[Path, int]:
    """Results files in `results_dir` with their modification times (ns): the files a run writes are the ones new
    or changed afterwards, whatever its run name."""
    return {path: path.stat().st_mtime_ns for path in Path(results_dir).glob("*.json")}


def compare(config: Path, modes: list[str], overrides: list[str], results_dir: str, out: Optional[str] = None):
    """Run every mode on one recipe (each in its own process, so peak memory is per run) and tabulate the results."""
    from tqdm.auto import tqdm

    recipes_dir = find_recipe_script(config, read_recipe_name(config)).parent
    sys.path.insert(0, str(recipes_dir))
    import common

    for mode in modes:
        common.check_mode(mode)
    progress = [common.coerce(o.split("=", 1)[1], bool, "progress") for o in overrides
                if o.split("=", 1)[0].strip() == "progress"]
    config_name = _config_name(config)
    failed, paths = [], []
    for mode in tqdm(modes, desc="modes", unit="mode", disable=not (progress[-1] if progress else True)):
        mode_config = _sibling_config(config, mode) or config
        args = [f"mode={mode}", f"config_name={config_name}", f"results_dir={results_dir}", *overrides]
        tqdm.write(f"== {mode}: {mode_config} {' '.join(args)}")
        before = _results_files(results_dir)
        run = subprocess.run([sys.executable, "-m", "hf_lowrank.cli", "train", str(mode_config), *args])
        if run.returncode != 0:
            failed.append(mode)
            continue
        after = _results_files(results_dir)
        paths += sorted(path for path, stamp in after.items() if before.get(path) != stamp)  # what this run wrote
    records = [r for r in common.load_results(paths)] if paths else []
    table = common.results_table(records)
    task = records[0]["run_info"]["task"] if records else "none"
    stem = Path(out or results_dir) / f"{task}--compare--{config_name}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    note = ("Step-time ratio: median step time over the adamw run's (runs are sequential; each mode in its own "
            "process). Peak memory: " + (records[0]["train_info"].get("peak_memory_source", "") if records else ""))
    stem.with_suffix(".md").write_text(f"# {task}: {config_name}, modes {', '.join(modes)}\n\n{table}\n\n{note}\n")
    if records:
        common.plot_results(records, stem.with_suffix(".png"), title=f"{task} ({config_name})")
    print(table)
    print(f"\n{note}\nWrote {stem}.md" + (f" and {stem}.png" if records else ""))
    if failed:
        raise CommandError(f"Modes that failed: {', '.join(failed)} (see the output above).")
    return records


def environment() -> dict:
    import torch

    from hf_lowrank.hub import package_versions

    versions = package_versions()
    info = {"python": versions.pop("python"), "platform": platform.platform()}
    info.update({name: version or "not installed" for name, version in versions.items()})
    info["cpu_count"] = os.cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    info["cuda"] = (
        ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        if torch.cuda.is_available() else "not available"
    )
    info["mps"] = torch.backends.mps.is_available()
    info["offline"] = os.environ.get("HF_HUB_OFFLINE", "0")
    try:
        from hf_lowrank.optim import available_modes

        info["modes"] = ", ".join(available_modes()) + ", lora (PEFT)"
    except ImportError as err:
        info["modes"] = f"unavailable ({err})"
    return info


def _card(args):
    from hf_lowrank import hub

    target = Path(args.results)
    if args.push and not target.is_dir():
        raise ValueError("--push needs an output folder (saved weights), not a results file.")
    card = hub.render_model_card(target, repo_id=args.repo_id, license=args.license)
    hub.validate_card(card)
    if target.is_dir():
        card.save(target / "README.md")
        print(f"Wrote {target / 'README.md'}")
        if args.push:
            hub.push_to_hub(target, args.repo_id)
            print(f"Uploaded {target} to {args.repo_id}")
    elif args.output:
        card.save(args.output)
        print(f"Wrote {args.output}")
    else:
        print(card)


def positive_int(text: str) -> int:
    """argparse type for counts (processes, ports, tokens, rows): an integer >= 1, else a clear usage error."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-lowrank", description="Memory-efficient training recipes and tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "train and evaluate one recipe config"),
                       ("eval", "evaluate only (do_train=false), e.g. a saved checkpoint")):
        p = sub.add_parser(name, help=text)
        p.add_argument("config", type=Path, help="recipes/configs/<recipe>/<model>_<mode>.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=2e-5")
        p.add_argument("--launcher", choices=("python", "accelerate"), default="python",
                       help="python: run in this process; accelerate: `accelerate launch` the recipe script")
        p.add_argument("--accelerate-config", help="accelerate YAML, e.g. recipes/accelerate/multi_gpu.yaml")
        p.add_argument("--num-processes", type=positive_int,
                       help="processes to launch (GPUs; CPU processes on a machine without GPUs)")
        p.add_argument("--main-process-port", type=positive_int, help="rendezvous port of a multi-process run")
    p = sub.add_parser("compare", help="run several modes on one config; write a table and a plot")
    p.add_argument("config", type=Path)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--modes", default="adamw,galore,lora", help="comma-separated, or 'all' (every registered mode)")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--out", help="folder for the table/plot (default: the results folder)")
    p = sub.add_parser("card", help="render a model card from a results JSON or a saved output folder")
    p.add_argument("results", help="results/<run_name>.json or an output folder")
    p.add_argument("--repo-id")
    p.add_argument("--license", help="card metadata licence (default: apache-2.0, the licence of the hf_lowrank code)")
    p.add_argument("--output", help="write the card here instead of printing it")
    p.add_argument("--push", action="store_true", help="upload the output folder to --repo-id")
    sub.add_parser("env", help="versions, devices, threads, modes")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # key=value overrides may follow --options
    if extra and (args.command not in ("train", "eval", "compare") or any("=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command in ("train", "eval"):
            overrides = list(args.overrides) + (["do_train=false"] if args.command == "eval" else [])
            run_recipe(args.config, overrides, args.launcher, args.accelerate_config, args.num_processes,
                       args.main_process_port)
        elif args.command == "compare":
            if args.modes == "all":
                from hf_lowrank.optim import available_modes

                modes = [*available_modes(), "lora"]
            else:
                modes = [m.strip() for m in args.modes.split(",") if m.strip()]
            compare(args.config, modes, list(args.overrides), args.results_dir, args.out)
        elif args.command == "card":
            if args.push and not args.repo_id:
                raise ValueError("--push needs --repo-id <user>/<repo>.")
            _card(args)
        else:
            for key, value in environment().items():
                print(f"{key:<16} {value}")
    # Configuration errors become one line; anything else (a RuntimeError such as CUDA out of memory, a bug)
    # propagates with its traceback.
    except (ValueError, FileNotFoundError, ImportError, CommandError, subprocess.CalledProcessError) as err:
        print(f"hf-lowrank: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
