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


@pytest.mark.parametrize("config", ["minilm_galore.yaml", "minilm_lora.yaml", "minilm_gradnormlorp.yaml",
                                    "minilm_welore.yaml"])
def test_end_to_end_on_offline_default(config, tmp_path, capfd):
    metrics = glue.main(["--config", str(CONFIGS / config), f"results_dir={tmp_path}", *FAST])
    assert 0.0 <= metrics["accuracy"] <= 1.0
    out, err = capfd.readouterr()
    assert "it/s]" not in out + err and "%|" not in out + err  # progress=false: no bar (datasets, weights, Trainer)
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


# The GLUE files as the benchmark distributes them (glue_data/<TASK>/{train,dev}.tsv): header row (if any) + 2 rows.
GLUE_LAYOUTS = {
    "cola": ["gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
             "gj04\t0\t*\tThey drank the pub."],  # no header: source, label, original mark, sentence
    "sst2": ["sentence\tlabel", "it 's a charming and often affecting journey . \t1", "unflinchingly bleak \t0"],
    "mrpc": ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\tHe said \" yes .\tHe agreed .",
             "0\t3\t4\tA cat sat .\tThe stock fell ."],
    "qqp": ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "0\t1\t2\tHow do I cook?\tHow to cook?\t1",
            "1\t3\t4\tWhy is sky blue?\tWhat is AI?\t0"],
    "stsb": ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
             "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is "
             "taking off.\t5.000", "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man plays.\tA dog "
             "runs.\t0.500"],
    "mnli": ["index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label",
             "0\t1\t1e\tgov\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tIt rains.\tIt is wet.\tentailment\tentailment",
             "1\t2\t2c\tgov\t( a )\t( b )\t(ROOT a)\t(ROOT b)\tIt rains.\tIt is dry.\tcontradiction\t"
             "contradiction"],
    "qnli": ["index\tquestion\tsentence\tlabel", "0\tWho?\tHe did.\tentailment", "1\tWhen?\tBlue.\tnot_entailment"],
    "rte": ["index\tsentence1\tsentence2\tlabel", "0\tA dog barks.\tAn animal barks.\tentailment",
            "1\tA dog barks.\tA cat sleeps.\tnot_entailment"],
    "wnli": ["index\tsentence1\tsentence2\tlabel", "0\tI put the cake in the box.\tThe cake is in it.\t1",
             "1\tThe cup fell.\tThe table fell.\t0"],
}
EXPECTED = {  # the first row of each file after loading: Hugging Face `glue` columns, GLUE label ids
    "cola": {"sentence": "Our friends won't buy this analysis, let alone the next one we propose.", "label": 1},
    "sst2": {"sentence": "it 's a charming and often affecting journey . ", "label": 1},
    "mrpc": {"sentence1": 'He said " yes .', "sentence2": "He agreed .", "label": 1},
    "qqp": {"question1": "How do I cook?", "question2": "How to cook?", "label": 1},
    "stsb": {"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.", "label": 5.0},
    "mnli": {"premise": "It rains.", "hypothesis": "It is wet.", "label": 0},
    "qnli": {"question": "Who?", "sentence": "He did.", "label": 0},
    "rte": {"sentence1": "A dog barks.", "sentence2": "An animal barks.", "label": 0},
    "wnli": {"sentence1": "I put the cake in the box.", "sentence2": "The cake is in it.", "label": 1},
}


def write_files(tmp_path, task, lines, splits=None, suffix=".tsv"):
    splits = splits or ["train", glue.GLUE_TASKS[task].eval_split]
    for split in splits:
        (tmp_path / f"{split}{suffix}").write_text("\n".join(lines) + "\n")
    return [f"data_files.{split}={tmp_path / f'{split}{suffix}'}" for split in splits]


@pytest.mark.parametrize("task", list(GLUE_LAYOUTS))
def test_every_distributed_glue_layout_loads(task, tmp_path):
    cfg = glue.common.load_config(glue.GlueConfig, None, [f"task={task}", *write_files(tmp_path, task,
                                                                                       GLUE_LAYOUTS[task])])
    data = glue.load_glue(cfg)
    for split in data.values():
        assert len(split) == 2 and split[0] == EXPECTED[task]
    second = {"cola": 0, "sst2": 0, "mrpc": 0, "qqp": 0, "stsb": 0.5, "mnli": 2, "qnli": 1, "rte": 1, "wnli": 0}
    assert data["train"][1]["label"] == second[task]


def test_explicit_column_mapping_and_clear_errors_for_files_that_do_not_fit(tmp_path):
    lines = ["id\tquery\tpassage\tanswer", "0\tIs it wet?\tIt rains.\t0", "1\tIs it dry?\tIt rains.\t1"]
    files = write_files(tmp_path, "rte", lines)
    cfg = glue.common.load_config(glue.GlueConfig, None, ["task=rte", "text_columns=[query,passage]",
                                                          "label_column=answer", *files])
    assert glue.load_glue(cfg)["train"][1] == {"sentence1": "Is it dry?", "sentence2": "It rains.", "label": 1}
    for overrides, message in [
        ([], r"has columns \['id', 'query', 'passage', 'answer'\]; GLUE rte reads its text from \['sentence1', "
             r"'sentence2'\]: set text_columns=\[<col1>,<col2>\]"),
        (["text_columns=[query,passage]"], r"no label column \(label\): set label_column=<col>"),
        (["text_columns=[query,text]"], r"not text_columns=\['query', 'text'\]: fix text_columns"),
        (["text_columns=[query,passage]", "label_column=gold"], r"not label_column='gold'"),
        (["text_columns=[query,passage]", "label_column=query"], r"label 'Is it wet\?' is not a GLUE rte label "
                                                                r"\(0\.\.1 or one of \['entailment', 'not_entailment'\]\)"),
    ]:
        cfg = glue.common.load_config(glue.GlueConfig, None, ["task=rte", *overrides, *files])
        with pytest.raises(ValueError, match=message):
            glue.load_glue(cfg)
    with pytest.raises(ValueError, match=r"`text_columns` names 1 column\(s\) but GLUE rte reads 2"):
        glue.common.load_config(glue.GlueConfig, None, ["task=rte", "text_columns=[query]"])
    scores = write_files(tmp_path, "stsb", ["sentence1\tsentence2\tscore", "a\tb\thigh"])
    with pytest.raises(ValueError, match="STS-B scores must be numbers, got 'high'"):
        glue.load_glue(glue.common.load_config(glue.GlueConfig, None, ["task=stsb", *scores]))
    unlabelled = write_files(tmp_path, "cola", ["index\tsentence", "0\tBill whistled."], ["validation"])
    cfg = glue.common.load_config(glue.GlueConfig, None, ["task=cola", "do_train=false", *unlabelled])
    with pytest.raises(ValueError, match="GLUE's test.tsv files carry no labels"):
        glue.load_glue(cfg)


def test_mis_shaped_file_gets_one_line_error_from_the_cli(tmp_path, capsys):
    from hf_lowrank import cli

    files = write_files(tmp_path, "sst2", ["text\tpolarity", "good\t1"])
    assert cli.main(["train", str(CONFIGS / "minilm_adamw.yaml"), *files, "progress=false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has columns ['text', 'polarity']" in err and "text_columns=" in err


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
