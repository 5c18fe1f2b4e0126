"""lm-evaluation-harness path (recipes/harness.py): metrics on a tiny model and local task files against a hand
computation, our scorer's agreement with the harness on constructed items, and the errors bad input gets."""
import json
import sys

import pytest
import torch

from tests._causal_lm_helpers import REPO, save_tiny_causal_lm


pytest.importorskip("lm_eval")
sys.path.insert(0, str(REPO / "recipes"))
import harness  # noqa: E402
import mmlu  # noqa: E402
import models  # noqa: E402
import scoring  # noqa: E402


ARC_ITEMS = [  # (question, options, gold)
    ("Which is red?", ["an apple", "the sky", "grass"], 0),
    ("What do you see at night?", ["the sun", "the stars"], 1),
    ("Which animal barks?", ["a cat", "a dog", "a fish", "a bird"], 1),
    ("What is water made of?", ["hydrogen and oxygen", "salt", "sand"], 0),
    ("Which season is the coldest?", ["summer", "spring", "winter"], 2),
]
WINOGRANDE_ITEMS = [  # (sentence, option1, option2, gold)
    ("The trophy does not fit in the suitcase because the _ is too big.", "trophy", "suitcase", 0),
    ("Tom gave Bob the ball because _ was done playing.", "Tom", "Bob", 0),
    ("Anna lent Maria a book since _ had finished it.", "Anna", "Maria", 0),
]


def arc_record(question, options, gold):
    listed = " ".join(f"Answer{i + 1}: {o}" for i, o in enumerate(options))
    labels = "/".join(f"answer{i + 1}" for i in range(len(options)))
    return {"instruction": f"Please choose the correct answer to the question: {question}\n\n{listed}\n\n"
                           f"Answer format: {labels}",
            "input": "", "output": f"the correct answer is answer{gold + 1}", "answer": f"answer{gold + 1}"}


def winogrande_record(sentence, option1, option2, gold):
    return {"instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
                           f"{sentence}\n\nOption1: {option1} Option2: {option2}\n\nAnswer format: option1/option2",
            "input": "", "output": f"the correct answer is option{gold + 1}", "answer": f"option{gold + 1}"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return models.load_causal_lm(str(save_tiny_causal_lm(tmp_path_factory.mktemp("model"))))


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    arc, wino = folder / "arc.json", folder / "winogrande.jsonl"
    arc.write_text(json.dumps([arc_record(*item) for item in ARC_ITEMS]))
    wino.write_text("\n".join(json.dumps(winogrande_record(*item)) for item in WINOGRANDE_ITEMS))
    return {"ARC-Easy": str(arc), "winogrande": str(wino)}


def logprob(model, tokenizer, context, continuation):
    """log p(continuation | context), straight from one forward pass of the model."""
    context_ids = tokenizer(context)["input_ids"]
    ids = tokenizer(context + continuation)["input_ids"]
    assert ids[: len(context_ids)] == context_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logprobs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def test_metrics_equal_a_hand_computation_on_local_files(tiny, task_files):
    model, tokenizer = tiny
    model.train()
    rng_before = torch.random.get_rng_state()
    got = harness.evaluate_with_harness(model, tokenizer, ["ARC-Easy", "winogrande"], data_files=task_files,
                                        batch_size=2, progress=False)
    assert model.training and torch.equal(torch.random.get_rng_state(), rng_before)  # caller's state kept
    model.eval()
    acc, acc_norm = [], []
    for question, options, gold in ARC_ITEMS:  # the harness's ARC definition: "Question: q\nAnswer:" + " option"
        lls = [logprob(model, tokenizer, f"Question: {question}\nAnswer:", f" {o}") for o in options]
        acc.append(argmax(lls) == gold)
        acc_norm.append(argmax([ll / len(o) for ll, o in zip(lls, options)]) == gold)
    assert got["ARC-Easy"] == {"acc": pytest.approx(sum(acc) / 5), "acc_norm": pytest.approx(sum(acc_norm) / 5),
                               "n": 5}
    wino = []
    for sentence, *options, gold in WINOGRANDE_ITEMS:  # partial scoring: the text after the blank, per option
        blank = sentence.index("_")
        lls = [logprob(model, tokenizer, sentence[:blank] + o, " " + sentence[blank + 1:].strip()) for o in options]
        wino.append(argmax(lls) == gold)
    assert got["winogrande"]["acc"] == pytest.approx(sum(wino) / 3) and got["winogrande"]["n"] == 3
    limited = harness.evaluate_with_harness(model, tokenizer, ["arc_easy"], data_files={"arc_easy": task_files[
        "ARC-Easy"]}, limit=2, progress=False)
    assert limited["arc_easy"]["n"] == 2


def test_progress_false_prints_no_progress_bar(tiny, task_files, capfd):
    model, tokenizer = tiny
    capfd.readouterr()
    harness.evaluate_with_harness(model, tokenizer, ["ARC-Easy"], data_files=task_files, limit=2, progress=False)
    assert "it/s" not in capfd.readouterr().err
    harness.evaluate_with_harness(model, tokenizer, ["ARC-Easy"], data_files=task_files, limit=2, progress=True)
    assert "it/s" in capfd.readouterr().err


def test_our_scorer_agrees_with_the_harness_on_its_own_requests(tiny, task_files):
    """Same (context, continuation) pairs: scoring.py's log-likelihoods equal the harness's; and MMLU's prompt and
    letter accuracy (shots included) equal the harness's."""
    model, tokenizer = tiny
    records = [arc_record(*item) for item in ARC_ITEMS]
    questions = [mmlu.Question(s, f"Question {i} about {s}?", ("one", "two", "three", "four"), i % 4)
                 for s in ("anatomy", "virology") for i in range(3)]
    shots = [mmlu.Question(s, f"Solved {s}?", ("a", "b", "c", "d"), 2) for s in ("anatomy", "virology")]
    configs = {"arc_easy": [harness.commonsense_config("arc_easy", records)],
               "mmlu": harness.mmlu_configs(questions, shots)}
    output = harness.simple_evaluate(model, tokenizer, configs, num_fewshot=1, log_samples=True, progress=False)
    for task, samples in output["samples"].items():
        contexts = [[ctx for ctx, _ in s["arguments"]] for s in samples]
        assert all(len(set(c)) == 1 for c in contexts)  # one context per document, the choices follow it
        ours = scoring.score_continuations(model, tokenizer, [c[0] for c in contexts],
                                           [[cont for _, cont in s["arguments"]] for s in samples])
        for sample, scores in zip(samples, ours):
            theirs = [response[0] for response in sample["filtered_resps"]]
            assert [s.logprob for s in scores] == pytest.approx(theirs, abs=1e-4), task
    mmlu_samples = {s["doc"]["question"]: s for t, v in output["samples"].items() if t.startswith("mmlu_") for s in v}
    for q in questions:
        expected = mmlu.build_prompt(q, [x for x in shots if x.subject == q.subject])
        assert mmlu_samples[q.question]["arguments"][0] == (expected, " A")
    ours = mmlu.evaluate(model, tokenizer, questions, {s.subject: [s] for s in shots}, num_fewshot=1)
    theirs = harness.run_configs(model, tokenizer, configs, num_fewshot=1, progress=False)
    assert theirs["mmlu"]["acc"] == pytest.approx(ours["accuracy_micro"])
    assert theirs["mmlu"]["acc_macro"] == pytest.approx(ours["accuracy_macro"])
    assert theirs["mmlu_anatomy"]["acc"] == pytest.approx(ours["per_subject"]["anatomy"])
    assert theirs["mmlu"]["n"] == 6


def test_few_shot_examples_never_include_the_scored_item(tiny, task_files):
    model, tokenizer = tiny
    configs = {"winogrande": [harness.commonsense_config(
        "winogrande", [winogrande_record(*item) for item in WINOGRANDE_ITEMS])]}
    output = harness.simple_evaluate(model, tokenizer, configs, num_fewshot=2, log_samples=True, progress=False)
    for sample in output["samples"]["winogrande"]:
        own = sample["doc"]["sentence"][: sample["doc"]["sentence"].index("_")]
        context = sample["arguments"][0][0]
        assert context.count(own) == 1 and context.count("\n\n") == 2  # two other solved items, then this one


def test_bad_input_gets_clear_errors(tiny, task_files, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="Unknown harness task 'sciq'.*Valid tasks"):
        harness.evaluate_with_harness(model, tokenizer, ["sciq"])
    with pytest.raises(ValueError, match=r"no shipped test set: pass data_files=\{'hellaswag'"):
        harness.evaluate_with_harness(model, tokenizer, ["hellaswag"])
    with pytest.raises(ValueError, match="same harness task 'arc_easy'"):
        harness.evaluate_with_harness(model, tokenizer, ["ARC-Easy", "arc_easy"], data_files=task_files)
    with pytest.raises(ValueError, match="num_fewshot=3 needs at least"):
        harness.evaluate_with_harness(model, tokenizer, ["winogrande"], data_files=task_files, num_fewshot=3)
    with pytest.raises(ValueError, match="non-empty list"):
        harness.evaluate_with_harness(model, tokenizer, "piqa")
    no_blank = tmp_path / "wino.json"
    no_blank.write_text(json.dumps([winogrande_record("No blank here.", "a", "b", 0)]))
    with pytest.raises(ValueError, match="'_' blank"):
        harness.evaluate_with_harness(model, tokenizer, ["winogrande"], data_files={"winogrande": str(no_blank)})
    with pytest.raises(ValueError, match="piqa records list 2 options, this one lists 3"):
        harness.commonsense_config("piqa", [arc_record(*ARC_ITEMS[0])])


def test_llm_adapters_records_become_the_schema_each_definition_reads():
    record = arc_record(*ARC_ITEMS[2])
    docs = harness.commonsense_config("openbookqa", [record])["custom_dataset"]()["test"]
    assert docs[0] == {"question_stem": "Which animal barks?", "answerKey": "B",
                       "choices": {"text": ["a cat", "a dog", "a fish", "a bird"], "label": ["A", "B", "C", "D"]}}
    siqa = arc_record("Kai sat down. What will Kai want to do next?", ["rest", "run", "eat"], 0)
    doc = harness.commonsense_doc("social_iqa", siqa, "siqa")
    assert (doc["context"], doc["question"], doc["label"]) == ("Kai sat down.", "What will Kai want to do next?", "1")
    boolq = {"instruction": "Please answer the following question with true or false, question: is it wet?\n\n"
                            "Answer format: true/false", "input": "", "output": "", "answer": "false"}
    assert harness.commonsense_doc("boolq", boolq, "boolq") == {"passage": "", "question": "is it wet", "label": 0}
