"""The repository stands on its own: it cites nothing a user of a clone does not have (team-internal
files, issue threads, notes). What a reader needs is stated here: the README, docs/, comments."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("blip2", "pipelines", "tests", "cluster", "benchmarks", "docs")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh", ""}
CITATION = re.compile(r"ENVIRONMENT\.md|DESIGN\.md|STYLE\.md|\.\./shared|\bshared/\w+\.md|\bnotes\b|"
                      r"\b(foundation|training|serving|capfilt) issue|\bissue #?\d+|\bthe issue\b", re.IGNORECASE)


def _files():
    yield from (ROOT / name for name in ("README.md", "Makefile", "pyproject.toml") if (ROOT / name).is_file())
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts \
                    and path != Path(__file__).resolve():
                yield path


def test_the_repository_cites_no_internal_files_issues_or_notes():
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in _files() for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if CITATION.search(line)]
    assert found == [], "\n".join(found)
