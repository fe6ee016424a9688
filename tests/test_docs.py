"""The README and docs/: every relative link and #anchor leads somewhere, every recipe file they
name exists and holds commands main.py takes, and the README stays short."""
import re

import pytest
from conftest import ROOT

import main
import recipes

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *ROOT.glob("*/README.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
RECIPES = sorted((ROOT / "experiments").glob("*.txt"))


def anchors(page):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = [line.lstrip("#").strip() for line in page.read_text().splitlines() if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_exists(page):
    in_code = False
    for line in page.read_text().splitlines():
        in_code ^= line.startswith("```")
        for target in [] if in_code else LINK.findall(line):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link to missing {target}"
            if anchor:
                assert anchor in anchors(dest), f"{page.name}: no heading for #{anchor} in {dest.name}"


def test_the_readme_is_short_and_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 10_500
    first_screen = "\n".join(text.splitlines()[:15])
    assert "pip install -r requirements.txt" in first_screen and "python main.py" in first_screen
    assert "pytest -q" in first_screen


def test_every_recipes_file_the_docs_name_exists():
    named = {m for page in PAGES for m in re.findall(r"--recipes (experiments/\S+)", page.read_text())}
    assert named, "no page names a recipes file: the pattern is stale"
    missing = sorted(m for m in named if not (ROOT / m).is_file())
    assert not missing, f"docs name recipe files that are not there: {missing}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_is_a_command_main_takes(path, capsys):
    """A documented table is only reproducible if its recipes still parse (a renamed flag breaks them)."""
    parser = main.get_args_parser()
    for name, flags in recipes.read_recipes(path).items():
        try:
            parser.parse_args(flags)
        except SystemExit:
            pytest.fail(f"{path.name}: recipe {name!r}: {capsys.readouterr().err.strip().splitlines()[-1]}")


def test_a_recipe_named_in_several_files_has_the_same_flags_in_each():
    """The seeds files repeat the exploration's recipes so that compare.py keeps their finished runs;
    a recipe edited in one file only would silently stop matching (and rerun, or mislabel a table)."""
    seen = {}
    for path in RECIPES:
        for name, flags in recipes.read_recipes(path).items():
            first = seen.setdefault(name, (path.name, flags))
            assert first[1] == flags, f"recipe {name!r} differs between {first[0]} and {path.name}"
