"""Smoke run of the main job (benchmarks/main_job.py): a tiny LLaMA in place of SmolLM2, two arms, two steps; the
table, the memory breakdown, the target lines and the PNG are produced from per-arm processes' results."""
import json

from _causal_lm_helpers import save_tiny_causal_lm

from benchmarks import main_job


def test_main_job_smoke_writes_table_and_plot(tmp_path):
    model_dir = save_tiny_causal_lm(tmp_path / "tiny")
    texts = {}
    for split in ("train", "heldout"):  # the head of each shipped file keeps tokenization quick
        texts[split] = tmp_path / f"{split}.txt"
        shipped = main_job.REPO_ROOT / "data" / "main_job" / f"wikitext2_{split}.txt"
        texts[split].write_text(shipped.read_text()[:20000])
    out = tmp_path / "out"
    main_job.main(["--arms", "adamw,galore_8bit_layerwise", "--out-dir", str(out), f"model_name_or_path={model_dir}",
                   f"train_file={texts['train']}", f"eval_file={texts['heldout']}", "max_steps=2", "eval_every=1",
                   "eval_blocks=2", "max_seq_length=32", "rank=4", "harness_limit=2"])
    table = (out / "main_job.md").read_text()
    assert (out / "main_job.png").stat().st_size > 0
    assert "| adamw | adamw |" in table and "| galore_8bit_layerwise | galore_8bit (layer-wise) |" in table
    assert "## Peak memory breakdown (MB)" in table and "arc_easy" in table
    assert "peak memory" in table.split("## Targets")[1] and "held-out loss" in table.split("## Targets")[1]
    for arm in ("adamw", "galore_8bit_layerwise"):
        record = json.loads((out / "main_job_runs" / f"{arm}.json").read_text())
        assert record["run_info"]["status"] == "ok"
        assert [step for step, _ in record["train_info"]["heldout_history"]] == [0, 1, 2]
        assert record["train_info"]["memory"]["peak_rss_bytes"] > 0
