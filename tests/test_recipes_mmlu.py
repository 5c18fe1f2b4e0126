"""MMLU recipe: prompt format, shipped data, letter scoring, shared scorer exactness, end-to-end run."""
import json
import sys
from collections import Counter

import pytest
import torch

from tests._causal_lm_helpers import REPO, FavouringLM, save_tiny_causal_lm, train_tiny_tokenizer


sys.path.insert(0, str(REPO / "recipes"))
import mmlu  # noqa: E402
import models  # noqa: E402
import scoring  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer()


def q(subject="college_physics", question="What is 2+2?", answer=2):
    return mmlu.Question(subject, question, ("1", "3", "4", "5"), answer)


def test_prompt_matches_the_standard_format():
    shot = q(question="What is 1+1?", answer=3)
    assert mmlu.build_prompt(q(), [shot]) == (
        "The following are multiple choice questions (with answers) about college physics.\n\n"
        "What is 1+1?\nA. 1\nB. 3\nC. 4\nD. 5\nAnswer: D\n\n"
        "What is 2+2?\nA. 1\nB. 3\nC. 4\nD. 5\nAnswer:"
    )
    assert mmlu.build_prompt(q()).endswith("about college physics.\n\nWhat is 2+2?\nA. 1\nB. 3\nC. 4\nD. 5\nAnswer:")


def test_fit_prompt_drops_shots_from_the_end(tokenizer):
    shots = [q(question=f"Shot number {i} " + "long words " * 20) for i in range(5)]
    full = mmlu.build_prompt(q(), shots)
    limit = len(tokenizer(mmlu.build_prompt(q(), shots[:2]))["input_ids"]) + 1
    fitted = mmlu.fit_prompt(q(), shots, tokenizer, limit)
    assert fitted == mmlu.build_prompt(q(), shots[:2]) and fitted != full
    assert mmlu.fit_prompt(q(), shots, tokenizer, None) == full


def test_shipped_data_parses_with_every_subject():
    cfg = mmlu.MMLUConfig(do_train=False)
    dev, val, test = (mmlu.load_split(cfg, s) for s in ("dev", "val", "test"))
    assert Counter(x.subject for x in dev) == {s: 5 for s in mmlu.SUBJECTS}
    assert Counter(x.subject for x in test) == {s: 20 for s in mmlu.SUBJECTS}
    assert len(val) == 1542 and set(x.subject for x in val) == set(mmlu.SUBJECTS)
    assert all(x.answer in range(4) and len(x.choices) == 4 and x.question for x in dev + val + test)
    assert dev[0] == mmlu.Question("abstract_algebra", "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.",
                                   ("0", "1", "2", "3"), 1)
    head = mmlu.stratified_head(test, 114)
    assert Counter(x.subject for x in head) == {s: 2 for s in mmlu.SUBJECTS}


def test_reads_hendrycks_headerless_files_and_rejects_bad_answers(tmp_path):
    (tmp_path / "virology_test.csv").write_text('"Which, virus?",a,b,c,d,C\nSecond?,a,b,c,d,A\n')
    items = mmlu.read_mmlu_csv(tmp_path / "virology_test.csv")
    assert items == [mmlu.Question("virology", "Which, virus?", ("a", "b", "c", "d"), 2),
                     mmlu.Question("virology", "Second?", ("a", "b", "c", "d"), 0)]
    cfg = mmlu.MMLUConfig(do_train=False, subjects=["virology"], data_files={"test": str(tmp_path)})
    assert mmlu.load_split(cfg, "test") == items
    (tmp_path / "bad_test.csv").write_text("Q?,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="answer 'E'"):
        mmlu.read_mmlu_csv(tmp_path / "bad_test.csv")


def test_bad_config_is_refused_early():
    with pytest.raises(ValueError, match="Unknown MMLU subjects.*Valid subjects"):
        mmlu.MMLUConfig(subjects=["astrology"])
    with pytest.raises(ValueError, match="train_split"):
        mmlu.MMLUConfig(train_split="test", eval_split="test")
    with pytest.raises(FileNotFoundError, match="data_files.train"):
        mmlu.load_split(mmlu.MMLUConfig(do_train=False), "train")


def test_letter_scoring_picks_the_favoured_answer_macro_and_micro(tokenizer):
    letter_c = tokenizer(" C", add_special_tokens=False)["input_ids"]
    assert len(letter_c) == 1
    model = FavouringLM(len(tokenizer), letter_c)
    questions = [q("anatomy", f"Q{i}?", answer=2) for i in range(3)] + [q("virology", "Q?", answer=0)]
    result = mmlu.evaluate(model, tokenizer, questions, {}, num_fewshot=0)
    assert result["per_subject"] == {"anatomy": 1.0, "virology": 0.0}
    assert result["accuracy_macro"] == pytest.approx(0.5)
    assert result["accuracy_micro"] == pytest.approx(0.75)


def _reference_logprob(model, tokenizer, context, option):
    ids = tokenizer(context)["input_ids"] + tokenizer(option, add_special_tokens=False)["input_ids"]
    n = len(tokenizer(option, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logprobs[len(ids) - n - 1 + i, ids[len(ids) - n + i]].item() for i in range(n))


def test_batched_shared_prefix_scores_equal_one_pass_per_candidate(tmp_path, tokenizer):
    save_tiny_causal_lm(tmp_path)
    model, tok = models.load_causal_lm(str(tmp_path))
    contexts = ["Question: which is red?\nAnswer:", "Short", "The following are multiple choice questions about x"]
    candidates = [[" A", " B", " apple pie", " apple"], [" one"], [" C", " D"]]
    batched = scoring.score_continuations(model, tok, contexts, candidates, batch_size=3)
    single = scoring.score_continuations(model, tok, contexts, candidates, batch_size=1)
    for ctx, options, got_b, got_s in zip(contexts, candidates, batched, single):
        for option, b, s in zip(options, got_b, got_s):
            ref = _reference_logprob(model, tok, ctx, option)
            assert b.logprob == pytest.approx(ref, abs=1e-4) and s.logprob == pytest.approx(ref, abs=1e-4)
            assert b.num_tokens == len(tok(option, add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match="no candidates"):
        scoring.score_continuations(model, tok, ["x"], [[]])


def test_supervised_features_mask_the_prompt_and_keep_the_answer(tokenizer):
    feats = models.supervised_features(tokenizer, "word " * 50 + "Answer:", " B", max_length=16)
    answer_ids = tokenizer(" B", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(feats["input_ids"]) == 16 and feats["input_ids"][-len(answer_ids):] == answer_ids
    assert feats["labels"] == [-100] * (16 - len(answer_ids)) + answer_ids
    full = models.supervised_features(tokenizer, "Answer:", " B", max_length=16, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]


def test_end_to_end_finetune_and_eval_writes_results(tmp_path):
    model_dir = save_tiny_causal_lm(tmp_path / "model")
    metrics = mmlu.main([
        "--config", str(REPO / "recipes" / "configs" / "mmlu" / "smollm2_galore.yaml"),
        f"model_name_or_path={model_dir}", "subjects=[anatomy, virology]", "max_steps=2", "batch_size=2",
        "max_seq_length=64", "rank=4", "num_fewshot=1", "max_eval_samples=6", "max_train_samples=8",
        f"results_dir={tmp_path / 'results'}", f"output_dir={tmp_path / 'out'}", "progress=false",
        "max_eval_length=256",
    ])
    record = json.loads((tmp_path / "results" / "mmlu--galore--2steps--1shot--anatomy+virology--smollm2.json"
                         ).read_text())
    assert record["train_info"]["steps"] == 2 and record["train_info"]["main_metric"] == "accuracy_macro"
    assert set(record["train_info"]["per_subject_accuracy"]) == {"anatomy", "virology"}
    assert record["train_info"]["num_eval_questions"] == 6
    assert record["train_info"]["metrics"]["accuracy_macro"] == pytest.approx(metrics["accuracy_macro"])
    assert 0.0 <= metrics["accuracy_micro"] <= 1.0
    assert record["train_info"]["optimizer_state_bytes"] > 0
    assert record["train_info"]["eval_mode"] == "letter" and record["train_info"]["limit"] == 6


def test_harness_eval_only_run_writes_harness_metrics(tmp_path):
    pytest.importorskip("lm_eval")
    model_dir = save_tiny_causal_lm(tmp_path / "model")
    common = ["--config", str(REPO / "recipes" / "configs" / "mmlu" / "smollm2_zeroshot.yaml"),
              f"model_name_or_path={model_dir}", "subjects=[anatomy, virology]", "num_fewshot=2",
              "max_eval_samples=6", f"results_dir={tmp_path / 'results'}", f"output_dir={tmp_path / 'out'}",
              "progress=false", "config_name=smollm2"]
    harness_metrics = mmlu.main([*common, "eval_mode=harness"])
    letter_metrics = mmlu.main([*common, "eval_mode=letter"])
    record = json.loads((tmp_path / "results" / "mmlu--fewshot2--anatomy+virology--harness--smollm2.json").read_text())
    info = record["train_info"]
    assert info["eval_mode"] == "harness" and info["num_fewshot"] == 2 and info["num_eval_questions"] == 6
    assert info["harness_metrics"]["n"] == 6 and info["harness_metrics"]["acc"] == pytest.approx(
        harness_metrics["accuracy_micro"])
    assert (tmp_path / "results" / "mmlu--fewshot2--anatomy+virology--smollm2.json").is_file()  # letter: the default
    # same prompts and letters: our scorer and the harness agree on every question
    assert harness_metrics["per_subject"] == pytest.approx(letter_metrics["per_subject"])


def test_result_names_tell_subjects_shots_and_protocols_apart():
    def name(**kwargs):
        return mmlu.MMLUConfig(config_name="smollm2", **kwargs).run_name

    assert name() == "mmlu--adamw--1epochs--5shot--smollm2"
    assert name(do_train=False, num_fewshot=0) == "mmlu--zeroshot--smollm2"
    assert name(do_train=False, subjects=["virology", "anatomy"], eval_mode="harness") == \
        "mmlu--fewshot5--anatomy+virology--harness--smollm2"
    assert len({name(), name(num_fewshot=0), name(max_steps=5), name(subjects=["anatomy"]),
                name(eval_mode="harness")}) == 5


def test_offline_alias_resolves_to_the_converted_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_LOWRANK_CACHE", str(tmp_path))
    converted = tmp_path / "smollm2-135m-instruct"
    converted.mkdir()
    (converted / "config.json").write_text("{}")
    assert models.resolve_model_path("SmolLM2-135M") == str(converted)
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (models.smollm2_gguf_dir() / models.SMOLLM2_GGUF_FILE).is_file()


def test_gguf_progress_bar_follows_transformers_switch():
    """transformers draws the GGUF dequantization bar with plain tqdm: progress=false turns it off too, and the
    patch is undone on leaving the block."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging

    plain_tqdm = gguf_utils.tqdm
    try:
        logging.disable_progress_bar()
        with models.gguf_progress_follows_transformers():
            assert gguf_utils.tqdm(range(3)).disable
        assert gguf_utils.tqdm is plain_tqdm
        logging.enable_progress_bar()
        with models.gguf_progress_follows_transformers():
            assert gguf_utils.tqdm is plain_tqdm
    finally:
        logging.enable_progress_bar()
        gguf_utils.tqdm = plain_tqdm
