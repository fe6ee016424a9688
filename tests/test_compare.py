"""compare.py: a row per model, an error row for a failing one, no silent overwrite."""
import re

import pytest

import compare
import recipes


def test_failing_model_gets_an_error_row_and_the_others_complete(sample_root, tmp_path, capsys):
    out = tmp_path / "results"
    flags = ["--data_root", str(sample_root), "--weights", "none", "--epochs", "1", "--max_per_class", "12",
             "--image_size", "64", "--batch_size", "8", "--workers", "0", "--precision", "fp32",
             "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(out)]
    models, argv = compare.parse_args(["--models", "resnet18,no_such_net,mobilenet_v2", *flags])
    rows = compare.compare(models, argv)

    assert [r["model"] for r in rows] == ["resnet18", "no_such_net", "mobilenet_v2"]
    assert "unknown model 'no_such_net'" in rows[1]["error"]
    for r in (rows[0], rows[2]):
        assert "error" not in r, r.get("error")
        assert 0 <= r["accuracy"] <= 1 and r["train_s"] > 0 and r["infer_img_s"] > 0 and r["memory_mib"] > 0
    assert rows[0]["params_m"] > rows[2]["params_m"]  # resnet18 11.2M vs mobilenet_v2 2.2M (with our head)
    assert rows[0]["split_sha1"] == rows[2]["split_sha1"]  # the same images in the same splits

    table = (out / "model_comparison.md").read_text()
    assert "| resnet18 | " in table and "| mobilenet_v2 | " in table
    assert "| no_such_net | failed: unknown model" in table
    assert "identical split.csv): yes" in table
    assert (out / "model_comparison.png").stat().st_size > 10_000

    capsys.readouterr()
    with pytest.raises(SystemExit, match="--overwrite"):  # an earlier comparison is never replaced silently
        compare.compare(models, argv)


def test_a_bad_shared_flag_stops_before_the_second_model(sample_root, tmp_path, capsys):
    models, argv = compare.parse_args(["--models", "resnet18,mobilenet_v2", "--data_root", str(sample_root),
                                       "--epochs", "0", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="main.py refused the flags: .*argument --epochs: must be > 0"):
        compare.compare(models, argv)
    assert not (tmp_path / "compare" / "mobilenet_v2").exists()


def test_last_message_finds_the_error_among_progress_bars():
    log = "caching 24 images: 100%|###| 24/24\rtrain 1: 50%\nTraceback (most recent call last):\n  ...\n" \
          "RuntimeError: out of memory\n"
    assert recipes.last_message(log) == "RuntimeError: out of memory"
    assert recipes.last_message("") == "no output"


def test_recipes_run_once_per_seed_and_tabulate_mean_and_std(sample_root, tmp_path):
    recipes_file = tmp_path / "recipes.txt"
    recipes_file.write_text("# name: main.py flags\nsmall: --image_size 32\n"
                       "flip:  --image_size 32 --augment flip  # comment\n")
    flags = ["--data_root", str(sample_root), "--weights", "none", "--epochs", "1", "--max_per_class", "12",
             "--batch_size", "8", "--workers", "0", "--cache_dir", str(tmp_path / "cache"),
             "--output_dir", str(tmp_path / "out")]
    rows = recipes.compare_recipes(recipes_file, [0, 1], flags)
    assert list(rows) == ["small", "flip"] and rows["flip"]["flags"] == "--image_size 32 --augment flip"
    for name in rows:
        assert len(rows[name]["runs"]) == 2 and all("error" not in r for r in rows[name]["runs"])
        splits = [(tmp_path / "out" / "recipes" / name / f"seed{s}" / "split.csv").read_text() for s in (0, 1)]
        assert splits[0] != splits[1]  # each seed its own split
    aucs = [r["test_auc"] for r in rows["small"]["runs"]]
    table = (tmp_path / "out" / "recipes.md").read_text()  # named after the recipes file
    mean, std = sum(aucs) / 2, abs(aucs[0] - aucs[1]) / 2 ** 0.5  # the sample standard deviation of two values
    assert "| small | `--image_size 32` | " in table and f"{mean:.4f} ± {std:.4f}" in table


def test_a_grid_started_again_keeps_its_finished_runs_and_reruns_changed_ones(sample_root, tmp_path, monkeypatch):
    recipes_file = tmp_path / "recipes.txt"
    recipes_file.write_text("a: --image_size 32\n")
    flags = ["--data_root", str(sample_root), "--weights", "none", "--epochs", "1", "--max_per_class", "8",
             "--batch_size", "8", "--workers", "0", "--cache_dir", str(tmp_path / "cache"),
             "--output_dir", str(tmp_path / "out"), "--overwrite"]
    first = recipes.compare_recipes(recipes_file, [0], flags)
    ran = []
    real_run_main = recipes.run_main
    monkeypatch.setattr(recipes, "run_main", lambda argv, folder: ran.append(argv) or real_run_main(argv, folder))
    again = recipes.compare_recipes(recipes_file, [0, 1], flags)  # one more seed
    assert [argv[-1] for argv in ran] == ["1"]  # seed 0 was kept, seed 1 ran
    assert again["a"]["runs"][0] == first["a"]["runs"][0]
    recipes_file.write_text("a: --image_size 32 --augment none\n")  # other flags: not the same run, so it runs
    recipes.compare_recipes(recipes_file, [0], flags)
    assert ran[-1][-3:] == ["none", "--seed", "0"]


@pytest.mark.parametrize("text, says", [
    ("fast --epochs 1\n", "line 1: expected 'name: main.py flags'"),
    ("a: --epochs 1\n# note\na: --epochs 2\n", "line 3: recipe 'a' is already defined above"),
    ("# only a comment\n\n", "no recipes in it"),
    ("a: --data_root 'unclosed\n", "line 1: No closing quotation"),
    ("../../escape: --epochs 1\n", "line 1: recipe name '../../escape' names a folder"),
])
def test_a_bad_recipes_file_stops_before_any_run_naming_the_line(tmp_path, text, says):
    recipes_file = tmp_path / "r.txt"
    recipes_file.write_text(text)
    with pytest.raises(SystemExit, match=re.escape(says)):
        recipes.compare_recipes(recipes_file, [0], ["--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="cannot read the recipes file"):
        recipes.compare_recipes(tmp_path / "missing.txt", [0], ["--output_dir", str(tmp_path / "out")])


def test_time_to_quality_is_the_training_time_until_validation_first_reaches_it(tmp_path):
    import json
    for name, aucs in (("fast", [0.8, 0.91, 0.95]), ("never", [0.7, 0.8, 0.85])):
        run = tmp_path / name
        run.mkdir()
        rows = [f"{e + 1},{auc},90" for e, auc in enumerate(aucs)]
        (run / "history.csv").write_text("epoch,val_auc,epoch_s,train_img_s\n" + "\n".join(r + ",20" for r in rows))
        (run / "metrics.json").write_text(json.dumps({"best_epoch": 3, "at_val_threshold": {"roc_auc": 0.9}}))
    fast, never = recipes.recipe_row(tmp_path / "fast"), recipes.recipe_row(tmp_path / "never")
    assert recipes.QUALITY == 0.90 and fast["to_quality"] == pytest.approx(3.0) and never["to_quality"] is None
    assert recipes.reached([fast, never]) == "3.0 (1 of 2)" and recipes.reached([never]) == "-"


def test_a_mistyped_recipe_is_refused_before_any_run_naming_its_line(sample_root, tmp_path):
    recipes_file = tmp_path / "r.txt"
    recipes_file.write_text("good: --image_size 32\n# a comment\ntypo: --agument flip\nalso_good: --epochs 1\n")
    with pytest.raises(SystemExit, match=r"r.txt, line 3 \(typo\): .*unrecognized arguments: --agument") as e:
        recipes.compare_recipes(recipes_file, [0], ["--data_root", str(sample_root), "--output_dir",
                                                    str(tmp_path / "out")])
    assert "good" not in str(e.value).replace("also_good", "") and not (tmp_path / "out").exists()


def test_a_failed_recipe_is_a_row_the_others_are_kept_and_the_exit_code_says_so(sample_root, tmp_path):
    import subprocess
    import sys
    recipes_file = tmp_path / "r.txt"
    recipes_file.write_text(f"ok: --image_size 32\nbroken: --data_root {tmp_path / 'nowhere'}\n"
                            "ok_too: --image_size 32 --augment none\n")
    flags = ["--data_root", str(sample_root), "--weights", "none", "--epochs", "1", "--max_per_class", "8",
             "--batch_size", "8", "--workers", "0", "--cache_dir", str(tmp_path / "cache"),
             "--output_dir", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, str(recipes.MAIN.with_name("compare.py")), "--recipes", str(recipes_file),
                           "--seeds", "0", *flags], capture_output=True, text=True)
    assert done.returncode == 1 and "1 run(s) failed" in done.stderr
    table = (tmp_path / "out" / "r.md").read_text()
    assert "| ok | " in table and "| ok_too | " in table and "(in progress)" not in table
    assert "| broken | " in table and "failed: exit code 1: error: " in table and "data folder not found" in table
