"""Commonsense recipe: LLM-Adapters prompt and parsing, shipped data, the three scorers, config errors, end to end."""
import json
import sys

import pytest

from tests._causal_lm_helpers import REPO, FavouringLM, save_tiny_causal_lm, train_tiny_tokenizer


sys.path.insert(0, str(REPO / "recipes"))
import commonsense as cs  # noqa: E402


PIQA_LIKE = {
    "instruction": "Please choose the correct solution to the question: How do I see the sky?\n\n"
                   "Solution1: look down at the red apple\n\nSolution2: look up at the blue sky\n\n"
                   "Answer format: solution1/solution2",
    "input": "", "output": "the correct answer is solution2", "answer": "solution2",
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def test_alpaca_prompt_is_the_llm_adapters_template():
    assert cs.alpaca_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo X.\n\n### Response:\n"
    )
    assert "### Input:\nctx\n\n### Response:\n" in cs.alpaca_prompt("Do X.", "ctx")


def test_shipped_files_and_option_parsing():
    expected_options = {"boolq": {0}, "piqa": {2}, "social_i_qa": {3}, "ARC-Easy": {3, 4, 5},
                        "ARC-Challenge": {3, 4, 5}}
    for task in cs.SHIPPED_TASKS:
        records = cs.read_records(cs.SHIPPED_DATA / task / "test.json")
        assert len(records) == 300
        counts = set()
        for record in records:
            labels = cs.answer_labels(record["instruction"])
            question, options = cs.split_options(record["instruction"])
            assert record["answer"] in labels and question and all(options)
            assert len(options) in (0, len(labels))
            counts.add(len(options))
        assert counts <= expected_options[task] and counts, task
    train = cs.read_records(cs.SHIPPED_TRAIN)
    assert len(train) == 3000 and all(r["output"] == f"the correct answer is {r['answer']}" for r in train)
    assert cs.split_options(PIQA_LIKE["instruction"]) == (
        "How do I see the sky?", ["look down at the red apple", "look up at the blue sky"])


def test_extract_answer_follows_llm_adapters():
    assert cs.extract_answer("social_i_qa", "the correct answer is answer2, not answer1", ["answer1"]) == "answer2"
    assert cs.extract_answer("boolq", "I think it is false.", ["true", "false"]) == "false"
    assert cs.extract_answer("piqa", "no idea", ["solution1", "solution2"]) == ""
    assert cs.extract_answer("custom", "pick choiceB", ["choiceA", "choiceB"]) == "choiceB"


def test_loglik_scoring_picks_the_favoured_label(tokenizer):
    label_ids = tokenizer(" solution2", add_special_tokens=False)["input_ids"]
    label_model = FavouringLM(len(tokenizer), label_ids[-1:])
    assert cs.predict_task(label_model, tokenizer, "piqa", [PIQA_LIKE], "loglik") == ["solution2"]
    metrics = cs.evaluate(label_model, tokenizer, {"piqa": [PIQA_LIKE, {**PIQA_LIKE, "answer": "solution1"}]},
                          eval_mode="loglik")
    assert metrics == {"piqa": 0.5, "average": 0.5}
    with pytest.raises(ValueError, match="'loglik' or 'generate'"):
        cs.predict_task(label_model, tokenizer, "piqa", [PIQA_LIKE], "harness")


def test_generate_mode_extracts_labels(tokenizer, monkeypatch):
    monkeypatch.setattr(cs.scoring, "generate_answers", lambda *a, **k: ["the correct answer is solution2", "hmm"])
    predictions = cs.predict_task(None, tokenizer, "piqa", [PIQA_LIKE, PIQA_LIKE], "generate")
    assert predictions == ["solution2", ""]


def test_generation_on_a_real_model_returns_labels_or_nothing(tmp_path):
    model, tokenizer = cs.models.load_causal_lm(str(save_tiny_causal_lm(tmp_path)))
    records = [PIQA_LIKE, {**PIQA_LIKE, "instruction": PIQA_LIKE["instruction"].replace("the sky", "it")}]
    texts = cs.scoring.generate_answers(model, tokenizer, [cs.alpaca_prompt(r["instruction"]) for r in records],
                                        max_new_tokens=4, batch_size=2)
    one_by_one = cs.scoring.generate_answers(model, tokenizer, [cs.alpaca_prompt(r["instruction"]) for r in records],
                                             max_new_tokens=4, batch_size=1)
    assert texts == one_by_one and all(texts) and tokenizer.padding_side == "right"  # left padding is exact
    predictions = cs.predict_task(model, tokenizer, "piqa", records, "generate", max_new_tokens=4)
    assert all(p in ("", "solution1", "solution2") for p in predictions)


def test_bad_config_is_refused_early(tmp_path):
    with pytest.raises(ValueError, match="Unknown or empty `tasks`.*Valid tasks"):
        cs.CommonsenseConfig(tasks=["sciq2"])
    with pytest.raises(ValueError, match="data_files.hellaswag=<test.json>"):
        cs.CommonsenseConfig(tasks=["boolq", "hellaswag"])
    with pytest.raises(FileNotFoundError, match="data_files.hellaswag"):
        cs.CommonsenseConfig(tasks=["hellaswag"], data_files={"hellaswag": str(tmp_path / "missing.json")})
    with pytest.raises(ValueError, match="eval_mode"):
        cs.CommonsenseConfig(eval_mode="beam")
    with pytest.raises(ValueError, match="num_fewshot=2.*eval_mode=harness"):
        cs.CommonsenseConfig(eval_mode="loglik", num_fewshot=2)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match="lacks"):
        cs.read_records(bad)


def test_end_to_end_finetune_and_harness_eval_writes_results(tmp_path):
    model_dir = save_tiny_causal_lm(tmp_path / "model")
    extra = tmp_path / "hellaswag.json"
    extra.write_text(json.dumps([{
        "instruction": f"Please choose the correct ending to complete the given sentence: Doors: {who} opens the door."
                       "\n\nEnding1: and walks in. Ending2: and flies away.\n\nAnswer format: ending1/ending2",
        "input": "", "output": "the correct answer is ending1", "answer": "ending1"} for who in ("He", "She")]))
    metrics = cs.main([
        "--config", str(REPO / "recipes" / "configs" / "commonsense" / "smollm2_adamw.yaml"),
        f"model_name_or_path={model_dir}", "tasks=[boolq, piqa, hellaswag]", f"data_files.hellaswag={extra}",
        "max_steps=2", "batch_size=2", "max_seq_length=96", "max_eval_samples=3", "max_train_samples=8",
        "num_fewshot=1", f"results_dir={tmp_path / 'results'}", f"output_dir={tmp_path / 'out'}", "progress=false",
    ])
    record = json.loads((tmp_path / "results" / "commonsense--adamw--2steps--1shot--boolq+hellaswag+piqa--smollm2.json"
                         ).read_text())
    info = record["train_info"]
    assert set(metrics) == {"boolq", "piqa", "hellaswag", "average"}
    assert info["steps"] == 2 and info["main_metric"] == "average" and info["eval_mode"] == "harness"
    assert info["num_eval_examples"] == {"boolq": 3, "piqa": 3, "hellaswag": 2}
    assert info["num_fewshot"] == 1 and info["limit"] == 3 and "lm-evaluation-harness" in info["eval_protocol"]
    assert info["harness_metrics"]["hellaswag"]["n"] == 2 and set(info["harness_metrics"]["piqa"]) == {
        "acc", "acc_norm", "n"}
    assert all(metrics[t] == info["harness_metrics"][t]["acc"] for t in ("boolq", "piqa", "hellaswag"))
    assert metrics["average"] == pytest.approx(sum(metrics[t] for t in ("boolq", "piqa", "hellaswag")) / 3)


def test_result_names_tell_task_sets_shots_and_protocols_apart():
    def name(**kwargs):
        return cs.CommonsenseConfig(config_name="smollm2", **kwargs).run_name

    shipped = name()
    assert shipped.startswith("commonsense--adamw--1epochs--5x-") and shipped.endswith("--smollm2")
    assert name(tasks=["piqa", "boolq"]) == name(tasks=["boolq", "piqa"]) == \
        "commonsense--adamw--1epochs--boolq+piqa--smollm2"
    assert len({shipped, name(tasks=["boolq"]), name(tasks=["boolq", "piqa"]), name(eval_mode="loglik"),
                name(max_steps=10), name(num_fewshot=5)}) == 6
    assert name(do_train=False) == f"commonsense--zeroshot--{shipped.split('--')[3]}--smollm2"
    assert name(do_train=False, num_fewshot=5).startswith("commonsense--fewshot5--5x-")
    assert name(run_name="mine") == "mine"


@pytest.mark.parametrize("mode", ["owlore", "lisa"])
def test_layer_sampling_modes_train_sampled_blocks(tmp_path, mode):
    model_dir = save_tiny_causal_lm(tmp_path / "model")
    metrics = cs.main([
        "--config", str(REPO / "recipes" / "configs" / "commonsense" / "smollm2_adamw.yaml"),
        f"model_name_or_path={model_dir}", "tasks=[boolq]", f"mode={mode}", "sampling_gamma=1",
        "sampling_interval=1", "calibration_batches=2", "rank=4", "max_steps=2", "batch_size=2",
        "max_seq_length=96", "max_eval_samples=3", "max_train_samples=8", f"results_dir={tmp_path / 'results'}",
        f"output_dir={tmp_path / 'out'}", "progress=false",
    ])
    record = json.loads((tmp_path / "results" / f"commonsense--{mode}--2steps--boolq--smollm2.json").read_text())
    assert record["train_info"]["steps"] == 2 and 0 <= metrics["boolq"] <= 1
    assert record["train_info"]["optimizer_state_bytes"] > 0
