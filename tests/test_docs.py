"""The documentation stays true to the code: the flag reference is what the parsers give, the README stays short,
and every relative link of README.md and docs/ reaches a file."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 300
MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# [text](target) and ![alt](target); the target ends at the first space (a title may follow) or parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


@pytest.fixture(scope="module")
def flag_reference():
    spec = importlib.util.spec_from_file_location("flag_reference", ROOT / "scripts" / "flag_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_flags_md_is_the_reference_the_parsers_generate(flag_reference):
    assert (ROOT / "docs" / "flags.md").read_text() == flag_reference.render(), \
        "docs/flags.md is stale: run python scripts/flag_reference.py --write"


def test_the_reference_has_a_row_for_every_flag_of_every_script(flag_reference):
    rows = {line.split("`")[1].split(" ")[0].rstrip(",") for line in flag_reference.render().splitlines()
            if line.startswith("| `-")}
    for script, parser in flag_reference.parsers().items():
        flags = {action.option_strings[0] for action in parser._actions
                 if action.option_strings and action.dest != "help"}
        assert flags <= rows, (script, sorted(flags - rows))


def test_check_fails_on_a_stale_reference_and_passes_once_written(flag_reference, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(flag_reference, "ROOT", tmp_path)
    monkeypatch.setattr(flag_reference, "FLAGS_DOC", tmp_path / "docs" / "flags.md")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "flags.md").write_text("# Flags\n\n| `--sparo_logit_scale` | `false` | removed |\n")
    assert flag_reference.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert flag_reference.main(["--write"]) == 0
    assert flag_reference.main(["--check"]) == 0


def test_readme_is_at_most_300_lines():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def _relative_links(path: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    targets = [match.group(1) for match in LINK.finditer(text)]
    return [target for target in targets if not re.match(r"^[a-z][a-z0-9+.-]*:|^#", target)]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(path):
    missing = [target for target in _relative_links(path)
               if not (path.parent / target.split("#", 1)[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


def test_the_link_check_sees_links_images_and_anchors_but_not_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/a.md) ![b](img.png \"title\") [c](https://x.org) [d](#top) [e](f.md#part)\n"
                    "`[g](not_a_link.md)`\n```\n[h](in_code.md)\n```\n")
    assert _relative_links(page) == ["docs/a.md", "img.png", "f.md#part"]


def test_every_flag_of_main_dino_says_why_it_is_here(flag_reference):
    """A flag beyond the reference's has to earn its place: adding one without a reason fails here."""
    parser = flag_reference.parsers()["main_dino.py"]
    flags = {action.dest for action in parser._actions if action.option_strings and action.dest != "help"}
    assert flags - flag_reference.DINO_FLAGS == set(flag_reference.WHY)
