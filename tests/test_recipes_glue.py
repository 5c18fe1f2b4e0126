"""recipes/glue.py: GLUE metrics, shipped data, end-to-end runs on the offline default, bad-input errors."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import glue  # noqa: E402


CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "glue"
FAST = ["max_steps=3", "batch_size=4", "max_seq_length=32", "max_train_samples=48", "max_eval_samples=40",
        "eval_batch_size=40", "progress=false", "logging_steps=1"]


def test_metrics_match_hand_computation_and_sklearn():
    labels = [1, 0, 1, 1, 0, 0, 1, 0]
    preds = [1, 0, 0, 1, 1, 0, 1, 0]  # tp=3, tn=3, fp=1, fn=1
    mrpc = glue.glue_metrics("mrpc", preds, labels)
    assert mrpc == {"accuracy": 0.75, "f1": 0.75}
    assert mrpc["f1"] == f1_score(labels, preds) and mrpc["accuracy"] == accuracy_score(labels, preds)
    mcc = glue.glue_metrics("cola", preds, labels)["matthews_correlation"]
    assert mcc == pytest.approx((3 * 3 - 1 * 1) / np.sqrt(4 * 4 * 4 * 4)) == matthews_corrcoef(labels, preds)
    assert glue.glue_metrics("rte", preds, labels) == {"accuracy": 0.75}
    scores, gold = [0.1, 2.0, 2.9, 4.2, 3.0], [0.0, 2.5, 3.6, 4.0, 3.5]  # one swapped pair: rho = 0.9
    stsb = glue.glue_metrics("stsb", scores, gold)
    assert stsb["pearson"] == pytest.approx(pearsonr(scores, gold)[0])
    assert stsb["spearman"] == pytest.approx(spearmanr(scores, gold)[0]) == pytest.approx(0.9)


@pytest.mark.parametrize("task", ["sst2", "mrpc", "rte"])
def test_shipped_subsets_load_with_glue_columns(task):
    cfg = glue.common.load_config(glue.GlueConfig, None, [f"task={task}"])
    data = glue.load_glue(cfg)
    spec = glue.GLUE_TASKS[task]
    assert set(data) == {"train", "validation"}
    assert len(data["validation"]) == {"sst2": 872, "mrpc": 408, "rte": 277}[task]  # full GLUE dev sets
    for key in filter(None, spec.text_keys):
        assert isinstance(data["train"][0][key], str) and data["train"][0][key]
    assert set(data["validation"]["label"]) == {0, 1}


@pytest.mark.parametrize("config", ["minilm_galore.yaml", "minilm_lora.yaml"])
def test_end_to_end_on_offline_default(config, tmp_path):
    metrics = glue.main(["--config", str(CONFIGS / config), f"results_dir={tmp_path}", *FAST])
    assert 0.0 <= metrics["accuracy"] <= 1.0
    mode = config.split("_")[1].removesuffix(".yaml")
    record = json.loads((tmp_path / f"sst2--{mode}--3steps--minilm.json").read_text())
    info = record["train_info"]
    assert info["metrics"] == metrics and info["main_metric"] == "accuracy" and info["steps"] == 3
    assert info["optimizer_state_bytes"] > 0 and info["peak_memory_bytes"] > 0
    assert 0 < info["trainable_params"] <= info["total_params"]
    if mode == "lora":
        assert info["trainable_params"] < info["total_params"] / 10
    assert record["run_info"]["config"]["max_seq_length"] == 32


def test_local_data_files_and_regression_head(tmp_path):
    rows = [{"sentence1": f"a cat {i}", "sentence2": f"a dog {i}", "label": float(i % 5)} for i in range(12)]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    metrics = glue.main([
        "task=stsb", "mode=galore", "rank=4", f"data_files.train={tmp_path / 'train.jsonl'}",
        f"data_files.validation={tmp_path / 'validation.jsonl'}", f"results_dir={tmp_path}", *FAST,
    ])
    assert set(metrics) == {"pearson", "spearman"}


@pytest.mark.parametrize("overrides, error, message", [
    (["task=sts"], ValueError, "Unknown GLUE task 'sts'. Valid tasks: cola, sst2"),
    (["mode=galore2"], ValueError, "Unknown mode 'galore2'. Valid modes:"),
    (["task=qqp"], FileNotFoundError, "No offline subset for GLUE task 'qqp'"),
    (["data_files.train=/nonexistent/train.jsonl"], FileNotFoundError, "data_files.train: file"),
    (["num_layers=3"], ValueError, "Unknown config key `num_layers`"),
])
def test_bad_input_fails_before_training(overrides, error, message):
    with pytest.raises(error, match=message):
        glue.main(overrides)


def test_model_whose_head_does_not_fit(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already has a 3-label classification head but GLUE sst2 needs 2"):
        glue.load_model(glue.common.load_config(glue.GlueConfig, None, [f"model_name_or_path={tmp_path}"]))


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = glue.common.load_config(glue.GlueConfig, path)
    assert cfg.recipe == "glue" and path.stem.endswith(f"_{cfg.mode}")
    assert "accelerate launch recipes/glue.py --config" in path.read_text() and "hf-lowrank train" in path.read_text()
