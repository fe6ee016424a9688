"""Training recipes over several seeds: run each `name: main.py flags` line once per seed and tabulate.

    python compare.py --recipes experiments/generalization.txt --seeds 0 1 2 \\
        --data_root ../shared/data/faces140k --output_dir results/generalization --test_sets ...

compare.py's --recipes runs compare_recipes() below. Every recipe runs once per seed (the seed sets
the split, the initial weights and the batches), each as its own `python main.py` process in
<output_dir>/recipes/<name>/seed<k>/, and <output_dir>/<file's name>.md tabulates validation and test
ROC-AUC as mean +/- std over the seeds, the --test_sets columns (data the model never trained on) and
their mean, the share of other reals called fake, training minutes and img/s. Every line's flags are
checked by main.py's parser before the first run; the table is rewritten after each recipe, so a stop
keeps every finished row, and a grid started again with the same flags keeps the runs that finished.
Pick a recipe by validation (or by the sets you chose to validate on): the test column is the report.
"""
import argparse
import csv
import itertools
import json
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

QUALITY = 0.90  # time to quality: the minutes of training until validation ROC-AUC first reached this
UNSEEN_MEAN = "unseen mean"  # the mean ROC-AUC over the --test_sets columns: data the model never trained on
IN_PROGRESS = "(in progress)"  # in a table's title until its last recipe is done
MAIN = Path(__file__).resolve().with_name("main.py")


# ---------------------------------------------------------------- running main.py

def last_message(log_text):
    """The last meaningful line of a run's output: the error message or exception."""
    lines = [ln.strip() for ln in log_text.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or ln.startswith(("Traceback", "Killed"))]
    return (errors or lines or ["no output"])[-1][:300]


def without_overwrite(flags):
    """The flags that decide a run's result: --overwrite only lets it replace an earlier one."""
    return [f for f in flags if f != "--overwrite"]


def without_output_dir(flags):
    """The flags minus --output_dir (the comparison's folder): each run gets its own folder instead, and its
    summary.md shows the command with one --output_dir, as a user would type it."""
    kept, skip = [], False
    for f in flags:
        if skip or f == "--output_dir" or f.startswith("--output_dir="):
            skip = f == "--output_dir" and not skip
            continue
        kept.append(f)
    return kept


def finished(argv, folder):
    """True if `folder` holds a completed run of exactly these flags (a grid started again after a stop
    keeps its finished runs; delete a folder to run it anew)."""
    command, metrics = folder / "command.json", folder / "metrics.json"
    if not (command.is_file() and metrics.is_file() and metrics.stat().st_mtime >= command.stat().st_mtime):
        return False
    if without_overwrite(json.loads(command.read_text())) != without_overwrite(argv):
        return False
    print(f"== {' '.join(argv)}: kept the finished run in {folder} (delete it to run it again)")
    return True


def interrupted_run(argv, folder):
    """True if `folder` holds a run of exactly these flags that stopped before its report (a Ctrl-C, a crash):
    the grid then resumes it from its last finished epoch instead of failing on the folder."""
    command = folder / "command.json"
    return (command.is_file() and (folder / "checkpoints" / "last.pt").is_file()
            and not (folder / "metrics.json").is_file()
            and without_overwrite(json.loads(command.read_text())) == without_overwrite(argv))


def run_main(argv, folder):
    """python main.py ARGV --output_dir FOLDER, its output in FOLDER/train.log; None, or why it failed. A run
    of the same flags that was interrupted there is resumed (--resume), its log continued.

    A subprocess, not a function call: a run that crashes or runs out of memory loses only its
    own row, and the peak memory main.py records then belongs to that run alone."""
    folder.mkdir(parents=True, exist_ok=True)
    resume = ["--resume"] if interrupted_run(argv, folder) else []
    (folder / "command.json").write_text(json.dumps(argv))  # what finished() compares a later grid's flags with
    print(f"== {' '.join(argv)}{' (resumed)' if resume else ''}: output in {folder / 'train.log'}", flush=True)
    with open(folder / "train.log", "a" if resume else "w") as log:
        child = subprocess.Popen([sys.executable, str(MAIN), *without_output_dir(argv), *resume,
                                  "--output_dir", str(folder)], stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = child.wait()
        except KeyboardInterrupt:  # the run got the Ctrl-C too: give it the time to keep its last epoch
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
    if rc == 0:
        return None
    why = f"exit code {rc}: {last_message((folder / 'train.log').read_text(errors='replace'))}"
    print(f"   failed ({why})")
    return why


CHECK = """import contextlib, io, json, sys
import main
sys.argv[0] = "main.py"  # argparse names the program from it: "main.py: error: ...", not "-c: error: ..."
refused = []
for argv in json.loads(sys.stdin.read()):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main.parse_args(argv)
        refused.append(None)
    except SystemExit:
        refused.append((err.getvalue().strip().splitlines() or ["refused"])[-1])
print(json.dumps(refused))
"""


def refused_flags(argvs):
    """main.py's verdict on each list of flags, checked before any run starts: None where it parses, else
    argparse's message. In a subprocess, so that this entry script never imports another."""
    done = subprocess.run([sys.executable, "-c", CHECK], input=json.dumps(argvs), capture_output=True, text=True,
                          cwd=MAIN.parent)
    if done.returncode:
        sys.exit(f"error: could not check the flags with main.py: {last_message(done.stderr)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def shared_flags():
    """The few main.py flags compare.py itself needs; main.py checks all of them."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--output_dir", default="results")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--image_size", default=None)
    return parser


# ---------------------------------------------------------------- recipes

RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # it names a folder: no path separators


def strip_comment(line):
    """The line up to its comment: a '#' that starts a word outside quotes, as in a shell (so a quoted
    'a#b' and a bare path/with#hash are kept whole)."""
    quote, escaped, word_starts = None, False, True
    for i, ch in enumerate(line):
        if escaped:
            escaped, word_starts = False, False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if ch == quote else quote
        elif ch == "#" and word_starts:
            return line[:i]
        else:
            quote = ch if ch in "'\"" else None
            word_starts = ch.isspace()
            continue
        word_starts = False
    return line


def read_recipes(path, lines=None):
    """{name: [main.py flags]} from lines `name: flags` ('#' starts a comment); `lines`, if given, gets
    {name: line number}. A bad file stops with one line naming the line: no colon, a name that is no
    plain folder name, a name used twice, an unclosed quote, or no recipe at all."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        sys.exit(f"error: {path}: cannot read the recipes file ({e.strerror})")
    recipes = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = strip_comment(raw).strip()
        if not line:
            continue
        name, colon, flags = (part.strip() for part in line.partition(":"))
        where = f"error: {path}, line {number}"
        if not colon:
            sys.exit(f"{where}: expected 'name: main.py flags', got {line!r}")
        if not RECIPE_NAME.fullmatch(name):
            sys.exit(f"{where}: recipe name {name!r} names a folder: use letters, digits and _ . + -")
        if name in recipes:
            sys.exit(f"{where}: recipe {name!r} is already defined above")
        try:
            recipes[name] = shlex.split(flags)
        except ValueError as e:  # shlex: "No closing quotation"
            sys.exit(f"{where}: {e}")
        if lines is not None:
            lines[name] = number
    if not recipes:
        sys.exit(f"error: {path}: no recipes in it (one 'name: main.py flags' per line)")
    return recipes


def mean_std(values):
    values = [v for v in values if v is not None and v == v]  # drop NaN and null (JSON's NaN)
    if not values:
        return "-"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 \
        else f"{values[0]:.4f}"


def reached(runs):
    """'mean minutes (k of n seeds)' until validation AUC first reached QUALITY; '-' if no seed did."""
    times = [r["to_quality"] for r in runs if r["to_quality"] is not None]
    return f"{statistics.mean(times):.1f} ({len(times)} of {len(runs)})" if times else "-"


def beyond_training_columns(test_sets):
    """({column: ROC-AUC}, {column: share of reals called fake}) of a run's --test_sets rows: every labelled
    folder, and every fake-only folder against the test reals and against the real-only folders named (pooled).
    The other pairings (each real-only folder alone) stay in the run's summary.md, to keep the table narrow."""
    rows = [r for r in test_sets[1:] if "error" not in r]
    named_fakes = {r["name"] for r in rows if r.get("kind") == "fakes"}
    named_reals = [r["name"] for r in rows if r.get("kind") == "reals"]
    pooled = "+".join(named_reals)
    aucs, false_alarms = {}, {}
    for r in rows:
        if r.get("kind") in ("labelled", None) and r.get("roc_auc") is not None:  # None: before pairing existed
            aucs[r["name"]] = r["roc_auc"]
        elif r.get("kind") == "pair" and r["fakes"] in named_fakes and r["reals"] in ("test reals", pooled):
            aucs[r["name"]] = r["roc_auc"]
            if r["reals"] == pooled:
                false_alarms[f"{pooled} called fake"] = r["reals_called_fake"]
    return aucs, false_alarms


def group_means(aucs, groups):
    """{"NAME mean": mean ROC-AUC of the columns whose set (the fake side of a pairing) is in the group} for
    groups {NAME: [set names]}: GAN, diffusion and face-swap columns each get a mean of their own, so that one
    kind's failure is not averaged away by another's success."""
    means = {}
    for name, sets in groups.items():
        known = [v for column, v in aucs.items() if column.split(" vs ")[0] in sets and v is not None and v == v]
        if known:
            means[f"{name} mean"] = statistics.mean(known)
    return means


def recipe_row(folder, groups=None):
    """What one finished recipe run left: val/test AUC, the AUCs beyond its training data, their mean (and the
    mean of each group of sets), minutes, img/s."""
    metrics = json.loads((folder / "metrics.json").read_text())
    with open(folder / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    best = history[metrics["best_epoch"] - 1]
    elapsed = itertools.accumulate(float(h["epoch_s"]) / 60 for h in history)
    hits = [m for h, m in zip(history, elapsed) if float(h["val_auc"]) >= QUALITY]
    aucs, false_alarms = beyond_training_columns(metrics.get("test_sets", []))
    known = [v for v in aucs.values() if v is not None and v == v]
    return {"val_auc": float(best["val_auc"]), "test_auc": metrics["at_val_threshold"]["roc_auc"],
            "to_quality": hits[0] if hits else None,  # None: validation never reached QUALITY
            "sets": {**aucs, **group_means(aucs, groups or {}),
                     **({UNSEEN_MEAN: statistics.mean(known)} if known else {})},  # no sets, no mean
            "called_fake": false_alarms,
            "minutes": sum(float(h["epoch_s"]) for h in history) / 60,
            "img_s": statistics.mean(float(h["train_img_s"]) for h in history)}


def compare_recipes(recipes_file, seeds, argv, groups=None):
    """Run every recipe once per seed; write <recipes file name>.md (mean +/- std over seeds) after each
    recipe, so a stop keeps every finished row. groups: {NAME: [--test_sets names]}, a mean column each.
    Returns the rows."""
    numbers = {}
    recipes = read_recipes(recipes_file, numbers)  # a bad line stops here, before any run
    if len(set(seeds)) < len(seeds):
        sys.exit(f"error: --seeds {' '.join(map(str, seeds))} names a seed twice: each seed is one run")
    sets_seed = lambda flags: any(f == "--seed" or f.startswith("--seed=") for f in flags)  # noqa: E731
    if sets_seed(argv):
        sys.exit("error: --seed: with --recipes the seeds come from --seeds (one run each); leave --seed out")
    for name, flags in recipes.items():
        if sets_seed(flags):
            sys.exit(f"error: {recipes_file}, line {numbers[name]} ({name}): sets --seed, but the seeds come from "
                     f"compare.py --seeds (one run each); leave --seed out of the recipe")
    refused = refused_flags([[*argv, *flags, "--seed", str(seeds[0])] for flags in recipes.values()])
    bad = [f"{recipes_file}, line {numbers[name]} ({name}): {why}" for name, why in zip(recipes, refused) if why]
    if bad:  # every line checked before the first run: a typo never costs the rows of the others
        sys.exit("error: main.py refuses these recipes, nothing was run:\n  " + "\n  ".join(bad))
    shared, _ = shared_flags().parse_known_args(argv)
    out = Path(shared.output_dir)
    md = out / f"{Path(recipes_file).stem}.md"  # several recipe files can share one output folder and its runs
    if md.exists() and IN_PROGRESS not in md.read_text().split("\n", 1)[0] and not shared.overwrite:
        sys.exit(f"{md} already holds a comparison; pass --overwrite to replace it, or pick another --output_dir")
    command = " ".join(["python compare.py --recipes", str(recipes_file), "--seeds", *map(str, seeds), *argv]
                       + (["--groups", *(f"{g}={','.join(sets)}" for g, sets in groups.items())] if groups else []))
    rows = {}
    for k, (name, flags) in enumerate(recipes.items(), 1):
        runs = []
        for seed in seeds:
            folder = out / "recipes" / name / f"seed{seed}"
            run_argv = [*argv, *flags, "--seed", str(seed)]
            error = None if finished(run_argv, folder) else run_main(run_argv, folder)
            runs.append({"error": error} if error else recipe_row(folder, groups))
        rows[name] = {"flags": " ".join(flags), "runs": runs}
        ok = [r for r in runs if "error" not in r]
        unseen = [r["sets"][UNSEEN_MEAN] for r in ok if UNSEEN_MEAN in r["sets"]]
        print(f"   {name}: test ROC-AUC {mean_std([r['test_auc'] for r in ok])}"
              + (f", {UNSEEN_MEAN} {mean_std(unseen)}" if unseen else "") + f" over {len(ok)} seed(s)")
        write_recipes_table(rows, md, command, done=k == len(recipes))
    print(f"wrote {md}")
    return rows


def write_recipes_table(rows, md, command, done=True):
    """<recipes file name>.md: one row per recipe, mean +/- std over its seeds ("in progress" until done)."""
    ok_runs = [r for row in rows.values() for r in row["runs"] if "error" not in r]
    sets = list(dict.fromkeys(s for r in ok_runs for s in r["sets"] if s != UNSEEN_MEAN))
    sets += [UNSEEN_MEAN] if sets else []
    alarms = list(dict.fromkeys(c for r in ok_runs for c in r["called_fake"]))
    lines = ["# Training recipes" + ("" if done else f" {IN_PROGRESS}"), "", f"Command: `{command}`", "",
             "| recipe | flags | val ROC-AUC | test ROC-AUC | " + "".join(f"{s} ROC-AUC | " for s in sets)
             + "".join(f"{c} | " for c in alarms)
             + f"minutes to val AUC {QUALITY} | training minutes | train img/s | seeds |",
             "| --- | --- | --- | --- | " + "--- | " * (len(sets) + len(alarms)) + "--- | --- | --- | --- |"]
    for name, row in rows.items():
        ok = [r for r in row["runs"] if "error" not in r]
        failed = "; ".join(r["error"] for r in row["runs"] if "error" in r).replace("|", "/")
        cells = [name, f"`{row['flags']}`", mean_std([r["val_auc"] for r in ok]), mean_std([r["test_auc"] for r in ok]),
                 *(mean_std([r["sets"].get(s, float("nan")) for r in ok]) for s in sets),
                 *(mean_std([r["called_fake"].get(c, float("nan")) for r in ok]) for c in alarms),
                 reached(ok),
                 f"{statistics.mean(r['minutes'] for r in ok):.1f}" if ok else "-",
                 f"{statistics.mean(r['img_s'] for r in ok):.1f}" if ok else "-",
                 f"{len(ok)}" + (f" (failed: {failed})" if failed else "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± standard deviation over the seeds; each seed has its own split, initial weights and "
              "batches. Validation AUC is the best epoch's (the one kept); test AUC is that checkpoint on the test "
              "split, at the threshold chosen on validation. Choose by validation, report test. The --test_sets "
              "columns are folders the model never trained on (a fake-only folder ranked against the test reals "
              f"and against the real-only folders named, pooled); {UNSEEN_MEAN} is their mean per run. Once recipes "
              "are chosen by them, they are validation for that choice, no longer a test. \"called fake\": the "
              "share of those reals called fake at the stored threshold. Minutes to val AUC: "
              f"training time (train + validation) until the first epoch whose validation ROC-AUC >= {QUALITY}, "
              "averaged over the seeds that got there.", ""]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines))
