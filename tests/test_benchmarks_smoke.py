"""Each benchmark's ``main`` runs end to end on a minuscule setting and writes its markdown table and plot."""
import pytest
import torch

from benchmarks import common, convergence, optimizer_memory, step_time


def assert_outputs(out_dir, name, must_contain):
    markdown = (out_dir / f"{name}.md").read_text()
    png = (out_dir / f"{name}.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert markdown.lstrip().startswith("# ") and "|---|" in markdown
    for text in must_contain:
        assert text in markdown, text
    return markdown


def test_optimizer_memory_sizes_state_through_the_optimizer(tmp_path):
    results = optimizer_memory.main([
        "--sizes", "60M", "1B", "--layers", "1", "--vocab", "256",
        "--modes", "adamw", "galore", "galore_8bit", "galore_dct", "galore:quant_bits=4", "--out-dir", str(tmp_path),
    ])
    assert_outputs(tmp_path, "optimizer_memory", ["torch AdamW", "galore_dct", "## Targets"])
    modes = results["1B"]["modes"]
    # One layer of LLaMA-1B (hidden 2048, intermediate 5461) + vocab-256 embeddings, all fp32.
    n_params = results["1B"]["params"]
    assert modes["torch AdamW"]["total"] == 2 * 4 * n_params + 4 * len(list(common.build_llama(
        2048, 5461, 32, 1, 256, device="meta").parameters()))  # two moments + a float32 step per tensor
    assert modes["adamw"]["total"] == 2 * 4 * n_params  # integer steps are not tensors
    # galore at rank 512: 7 projected matrices, each with a 2048 x 512 fp32 basis (the smaller side is 2048).
    assert modes["galore"]["projectors"] == 7 * 2048 * 512 * 4
    assert modes["galore_dct"]["projectors"] == 7 * 512 * 4  # int32 indices only
    assert modes["galore_dct"]["cache"] == 2048 * 2048 * 4  # one shared DCT matrix
    assert modes["galore:quant_bits=4"]["projectors"] < modes["galore"]["projectors"] / 4
    assert modes["galore_8bit"]["total"] < modes["galore"]["total"] / 2


def test_step_time_runs_interleaved_and_reports_ratios(tmp_path):
    results = step_time.main([
        "--hidden", "64", "--intermediate", "128", "--layers", "1", "--heads", "2", "--vocab", "256",
        "--batch", "2", "--seq", "16", "--rank", "8", "--rounds", "4", "--warmup", "1", "--gap-run", "2",
        "--modes", "adamw", "galore", "--refresh-shape", "64", "96", "--refresh-rank", "8", "--refresh-repeats", "1",
        "--out-dir", str(tmp_path),
    ])
    assert_outputs(tmp_path, "step_time", ["torch AdamW", "galore-torch GaLoreAdamW", "| galore |", "| dct |"])
    assert results["full"]["torch AdamW"] == pytest.approx(1.0)
    assert set(results["full"]) == {"torch AdamW", "torch AdamW foreach", "torch AdamW fused",
                                    "bitsandbytes AdamW8bit", "galore-torch GaLoreAdamW", "adamw", "galore"}
    assert all(ratio > 0 for ratio in results["full"].values())
    assert results["syncs"]["galore"] == {} and results["syncs"]["adamw"] == {}
    assert len(results["load"]) == 2
    assert set(results["refresh"]) == {"svd", "randomized", "dct", "random", "subspace", "galore-torch (svd)"}


def test_convergence_trains_every_candidate_on_the_same_batches(tmp_path):
    results = convergence.main([
        "--hidden", "64", "--intermediate", "128", "--layers", "1", "--heads", "2", "--steps", "6", "--batch", "2",
        "--seq", "32", "--rank", "8", "--gap", "6", "--eval-every", "3", "--eval-windows", "4",
        "--modes", "adamw", "galore", "--out-dir", str(tmp_path),
    ])
    assert_outputs(tmp_path, "convergence", ["torch AdamW", "| galore |", "x AdamW"])
    assert set(results) == {"torch AdamW", "galore-torch GaLoreAdamW", "adamw", "galore"}
    # Our full-rank adamw mode is the same algorithm as torch's AdamW up to where eps enters (tiny difference).
    assert results["adamw"] == pytest.approx(results["torch AdamW"], rel=1e-3)
    # Within one subspace period galore and galore-torch agree closely (same SVD, same update).
    assert results["galore"] == pytest.approx(results["galore-torch GaLoreAdamW"], rel=1e-3)
    assert all(6.0 > loss > 0 for loss in results.values())  # byte-level: ln(256) = 5.5 at start


def test_interleaved_times_rotates_the_order():
    order = []
    records = common.interleaved_times({"a": lambda: order.append("a"), "b": lambda: order.append("b") or {"x": 1}},
                                       repeats=3, warmup=1)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(records["a"]) == 3 and all(r["x"] == 1 for r in records["b"])


def test_corpus_splits_are_the_shipped_bytes():
    train, val = common.load_corpus("train"), common.load_corpus("val")
    assert train.numel() == 1_003_854 and val.numel() == 111_540
    assert int(torch.cat([train, val]).max()) < 128  # ASCII text
    with pytest.raises(ValueError, match="split"):
        common.load_corpus("test")


def test_qgalore_memory_counts_weights_gradients_and_state(tmp_path):
    from benchmarks import qgalore_memory

    qgalore_memory.main(["--sizes", "130M", "--layers", "1", "--out-dir", str(tmp_path)])
    assert_outputs(tmp_path, "qgalore_memory", ["q_galore", "## Targets", "projector bytes"])
    import json

    results = json.loads((tmp_path / "qgalore_memory.json").read_text())["130M"]
    q, g = results["q_galore"], results["galore"]
    assert q["weights"] < g["weights"] and q["projectors"] * 3.5 < g["projectors"]  # INT8 weights, INT4 vs bf16
    assert q["grads_largest"] < q["grads_all"]


def test_device_step_runs_on_cpu(tmp_path):
    from benchmarks import device_step

    device_step.main(["--device", "cpu", "--hidden", "64", "--intermediate", "256", "--heads", "2", "--layers", "1",
                      "--vocab", "256", "--rank", "8", "--seq", "16", "--warmup", "1", "--steps", "1",
                      "--modes", "galore", "q_galore", "--weight-group-size", "64", "--estimate", "galore+layerwise",
                      "--out-dir", str(tmp_path)])
    markdown = assert_outputs(tmp_path, "device_step_cpu", ["torch AdamW", "bitsandbytes AdamW8bit",
                                                             "q_galore+layerwise", "host syncs per step"])
    row = next(line for line in markdown.splitlines() if line.startswith("| galore+layerwise |"))
    assert row.endswith("| 0 |") and "%" in row  # sync-free, and its estimate is printed beside the measurement


def test_training_memory_estimates_and_validates_against_a_real_run(tmp_path):
    from benchmarks import training_memory

    results = training_memory.main([
        "--sizes", "1B", "--layers", "1", "--vocab", "256", "--seq", "32", "--modes", "galore", "galore+layerwise",
        "--val-shape", "64", "128", "2", "1", "128", "--val-rank", "8", "--val-modes", "galore_8bit",
        "--out-dir", str(tmp_path)])
    assert_outputs(tmp_path, "training_memory", ["galore+layerwise", "## Validation", "within 10%"])
    full, layerwise = (results["estimates"][("1B", name, False)] for name in ("galore", "galore+layerwise"))
    assert layerwise["gradients"] < full["gradients"] and layerwise["peak"] < full["peak"]
    assert full["optimizer state"] > 0 and full["weights"] > 0
    assert results["within"], results["validation"]


def test_subspace_projector_benchmark_times_refreshes_and_records_overlaps(tmp_path):
    from benchmarks import subspace_projector

    subspace_projector.main(["--shape", "128", "256", "--rank", "16", "--repeats", "1", "--seeds", "0",
                             "--steps", "60", "--jobs", "1", "--threads", "1", "--out-dir", str(tmp_path)])
    markdown = assert_outputs(tmp_path, "subspace_projector", ["subspace (warm)", "## Targets"])
    assert "warm refreshes" in markdown and "none in this budget" not in markdown


def test_colm_benchmark_runs_every_arm_and_reports_targets(tmp_path):
    from benchmarks import colm

    colm.main(["--steps", "4", "--seeds", "0", "--lr", "1e-3", "--batch", "4", "--train-size", "200",
               "--heldout", "8", "--matching-every", "2", "--time-rounds", "1", "--out-dir", str(tmp_path)])
    assert_outputs(tmp_path, "colm", ["random-b", "random-2b", "colm"])


def test_colm_fine_tuning_protocol_starts_every_arm_of_a_seed_from_one_pretrained_model(tmp_path):
    from types import SimpleNamespace

    from benchmarks import colm

    warm = SimpleNamespace(warm_start_steps=3, batch=4, seq=16)
    first, second = colm.initial_model(0, warm), colm.initial_model(0, warm)
    scratch = colm.initial_model(0, SimpleNamespace(warm_start_steps=0))
    for a, b, c in zip(first.parameters(), second.parameters(), scratch.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(first.parameters(), scratch.parameters()))
    colm.main(["--steps", "4", "--seeds", "0", "--lr", "1e-3", "--batch", "4", "--train-size", "200",
               "--heldout", "8", "--matching-every", "2", "--time-rounds", "1", "--warm-start-steps", "3",
               "--out-dir", str(tmp_path)])
    assert_outputs(tmp_path, "colm", ["fine-tuned from 3 WikiText-2 pre-training steps"])


def test_cuber_validation_grid_chooses_the_scales_update_and_lr_and_chosen_from_names_what_is_missing(tmp_path):
    from benchmarks import cuber

    assert cuber.candidates("correlated", "gpm") == [{}]
    assert cuber.candidates("correlated", "trgp") == [
        {"scale_update": "preconditioned", "scale_learning_rate": lr} for lr in (0.1, 0.01)]
    grid = cuber.candidates("pmnist10", "cuber")
    assert len(grid) == len(cuber.GRID_PENALTY) * len(cuber.SCALE_UPDATES) * len(cuber.SCALE_LR_FACTORS)
    assert {g["scale_learning_rate"] for g in grid} == {0.01, 0.001}
    assert cuber.candidates("pmnist10", "cuber", scale_lr=1e-3) == [
        {"penalty_lambda": v, "scale_update": update} for v in cuber.GRID_PENALTY for update in cuber.SCALE_UPDATES]
    chosen = tmp_path / "val.json"
    chosen.write_text('{"chosen": {"split/cuber": {"penalty_lambda": 1.0}}}')
    with pytest.raises(SystemExit, match="no choice for split/trgp"):
        cuber.main(["--sequences", "split", "--strategies", "trgp", "--chosen-from", str(chosen), "--seeds", "1",
                    "--out-dir", str(tmp_path)])


def test_glue_report_renders_cells_without_the_full_ft_arm(tmp_path):
    """Cells that ran only some arms (e.g. GradNormLoRP and WeLore) render with Δ and step ratios marked n/a."""
    from pathlib import Path

    from benchmarks import glue

    cells = sorted(str(p) for p in (Path(__file__).parents[1] / "benchmarks/results/glue_arms").glob("*-seed*.json"))
    assert cells
    glue.main(["--render", *cells, "--out", str(tmp_path / "glue")])
    assert_outputs(tmp_path, "glue", ["GradNormLoRP r8", "n/a (no full-FT arm)", "is not judged here"])


def test_glue_report_names_set_overrides_and_refuses_to_mix_them(tmp_path, capsys):
    """Cells run with `--set welore_rank_reduction=0.3` are labelled so; cells of different overrides do not merge;
    a mistyped key stops the run before any training, naming the key."""
    import json
    from pathlib import Path

    from benchmarks import glue

    source = Path(__file__).parents[1] / "benchmarks/results/glue_arms/seq128"
    paths = []
    for path in sorted(source.glob("mrpc-seed*.json")):
        cell = json.loads(path.read_text())
        cell["settings"]["overrides"] = ["welore_rank_reduction=0.3"]
        paths.append(tmp_path / path.name)
        paths[-1].write_text(json.dumps(cell))
    glue.main(["--render", *map(str, paths), "--out", str(tmp_path / "glue")])
    assert_outputs(tmp_path, "glue", ["WeLore ρ=0.3", "with `welore_rank_reduction=0.3`", "rank reduction 0.3"])
    with pytest.raises(SystemExit):
        glue.main(["--render", str(paths[0]), str(source / "mrpc-seed3.json"), "--out", str(tmp_path / "mixed")])
    with pytest.raises(SystemExit):
        glue.main(["--tasks", "mrpc", "--arms", "welore", "--set", "welore_rank_redution=0.3",
                   "--out", str(tmp_path / "typo" / "glue")])
    assert "Did you mean `welore_rank_reduction`" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_cuber_overlap_fewshot_gives_each_task_its_own_images_and_the_report_pairs_seeds():
    from benchmarks import cuber

    tasks = cuber.make_sequence("overlap_fewshot", 5)
    full = cuber.make_sequence("overlap", 5)
    seen = {}
    for (task_id, train, test), (_, _, full_test), classes in zip(tasks, full, cuber.OVERLAP_CLASSES):
        assert train.y.bincount().tolist() == [cuber.FEWSHOT_PER_CLASS] * len(classes)
        assert torch.equal(test.x, full_test.x)  # tested on every test-split image of its classes
        for row in train.x:
            key = row.numpy().tobytes()
            assert key not in seen, f"{task_id} reuses a training image of {seen.get(key)}"
            seen[key] = task_id
    entries = {("s", "trgp"): {"runs": [{"seed": 1, "bwt": 0.5}, {"seed": 2, "bwt": 0.0}]},
               ("s", "cuber"): {"runs": [{"seed": 1, "bwt": 1.0}, {"seed": 2, "bwt": 1.0}]}}
    assert cuber.paired_difference_lines(entries)[-1] == "| s | cuber | 2 | +0.750 | 0.250 | 2 | 0 |"
    grid = cuber.candidates("overlap_fewshot", "cuber-vd")  # amendment 5: the demotion rule on validation too
    assert len(grid) == len(cuber.DEMOTION_GRID) * len(cuber.GRID_PENALTY) * len(cuber.SCALE_LR_FACTORS)
    assert {g["demotion"] for g in grid} == set(cuber.DEMOTION_GRID)


def test_cuber_report_shows_how_much_of_the_regime3_subspace_stays_movable():
    from benchmarks import cuber

    entries = {("s", "cuber"): {"runs": [{"subspaces": [{"lin1": [10, 10]}, {"lin1": [20, 2], "lin2": [4, 0]}]},
                                         {"subspaces": [{}, {"lin1": [30, 0]}]}]},
               ("s", "trgp"): {"runs": [{"seed": 1}]},
               ("t", "cuber"): {"runs": [{"seed": 1}]}}  # recorded before the field existed: left out
    assert cuber.subspace_lines(entries)[-2:] == ["| s | cuber | 2 | lin1 | 1.50 | 20.0 | 4.0 | 20% |",
                                                  "| s | cuber | 2 | lin2 | 0.50 | 4.0 | 0.0 | 0% |"]
    assert cuber.subspace_lines({("t", "cuber"): {"runs": [{"seed": 1}]}}) == []


def test_cuber_merge_lets_a_rerun_supersede_the_same_seed_and_says_how_far_it_moved(tmp_path):
    from pathlib import Path

    from benchmarks import cuber

    runs = Path(__file__).parents[1] / "benchmarks/results/cuber_algorithm1_runs"
    part = runs / "amendments4_5/r10_overlap_fewshot_vd.json"
    cuber.main(["--merge", str(part), str(part), "--name", "merged", "--out-dir", str(tmp_path)])
    report = (tmp_path / "merged.md").read_text()
    assert "| overlap_fewshot | cuber-vd | 20 |" in report  # 20 seeds, not 40
    assert ("20 runs (overlap_fewshot/cuber-vd) were rerun by a later file of the merge, which supersedes them; the "
            "largest change of ACC or BWT between a run and its rerun: 0.0000 points.") in report


def test_glue_render_joins_cells_of_one_task_and_seed_from_separate_runs(tmp_path, capsys):
    """An lr grid extended by a later run renders as one grid per (task, seed); a point given twice, or cells of
    different settings, stop the render with a message naming the cells."""
    import json
    from pathlib import Path

    from benchmarks import glue

    arms = Path(__file__).parents[1] / "benchmarks/results/glue_arms"
    first, later = arms / "rte1600_galore/rte-seed5.json", arms / "rte1600_galore_grid/rte-seed5.json"
    joined = glue.merge_cells([json.loads(first.read_text()), json.loads(later.read_text())])
    assert len(joined) == 1 and [p["point"] for p in joined[0]["points"]] == [
        "galore lr×0.5", "galore lr×1", "galore lr×2"]
    assert len(joined[0]["commands"]) == 2
    glue.main(["--render", str(first), str(later), "--out", str(tmp_path / "joined")])
    assert "compare separate processes" in (tmp_path / "joined.md").read_text()
    with pytest.raises(SystemExit):
        glue.main(["--render", str(first), str(first), "--out", str(tmp_path / "twice")])
    assert "both have the point(s) ['galore lr×0.5']" in capsys.readouterr().err
    other = json.loads(later.read_text())
    other["settings"]["steps"] = 800
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit):
        glue.main(["--render", str(first), str(tmp_path / "other.json"), "--out", str(tmp_path / "mixed")])
    assert "ran with different settings" in capsys.readouterr().err
