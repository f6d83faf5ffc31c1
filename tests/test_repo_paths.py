"""Nothing in the repository points outside it, and every repository path the docs and the CLI name exists.

A clone has only its own files: the method is specified in ``docs/``, and a README link, a docstring,
a comment or a ``--help`` text that names a file must name one that a clone has.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rkd_engine.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]

# Files that only existed beside the repository while it was written, and absolute paths of that machine.
OUTSIDE = re.compile(r"\.\./shared\b|/work/|\bMETHOD\.md\b|\bSTYLE\.md\b")
# A relative path that climbs out of the directory it is written in.
CLIMB = re.compile(r"(?<![\w.])(?:\.\./)+[\w.-][\w./-]*")
# A Markdown link or image target: [text](target) or ![alt](target).
MD_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# A path into the repository's own top-level folders, as docstrings and help texts write them.
REPO_PATH = re.compile(r"(?<![\w./-])((?:docs|benchmarks|csrc|kernels|rkd_engine|tests|examples)/[\w./*-]*[\w*])")
# Files that rkd writes (into a run, sweep or report directory), named in help texts: not repository files.
WRITTEN = {"report.md"}


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (or one deleted from the work tree)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _exists(rel: str, base: Path = ROOT) -> bool:
    """``rel`` (maybe a glob, maybe with a trailing ``/``) names something under ``base`` inside the repository."""
    rel = rel.rstrip("/.,:;")
    target = (base / rel).resolve()
    if target != ROOT and ROOT not in target.parents:
        return False
    if any(ch in rel for ch in "*?["):
        return any(base.glob(rel))
    return target.exists()


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    files = {}
    for path in _tracked_files():
        text = _text(path)
        if text is not None:
            files[path.relative_to(ROOT).as_posix()] = text
    return files


def _where(name: str, text: str, match: re.Match) -> str:
    return f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)!r}"


def test_no_tracked_file_points_outside_the_repository(texts):
    this = Path(__file__).relative_to(ROOT).as_posix()
    found = [_where(n, t, m) for n, t in texts.items() if n != this for m in OUTSIDE.finditer(t)]
    for name, text in texts.items():
        base = (ROOT / name).parent
        for m in CLIMB.finditer(text) if name != this else ():
            target = (base / m.group(0)).resolve()
            if target != ROOT and ROOT not in target.parents:
                found.append(_where(name, text, m))
    assert not found, "references to paths outside the repository:\n" + "\n".join(found)


def test_markdown_links_resolve_inside_the_repository(texts):
    broken = []
    for name, text in texts.items():
        if not name.endswith(".md"):
            continue
        for m in MD_LINK.finditer(text):
            target = m.group(1).split("#", 1)[0]
            if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):  # an anchor, or a URL (https:, mailto:)
                continue
            if not _exists(target, (ROOT / name).parent):
                broken.append(_where(name, text, m))
    assert not broken, "Markdown links to files the repository does not have:\n" + "\n".join(broken)


def test_repository_paths_named_in_tracked_files_exist(texts):
    this = Path(__file__).relative_to(ROOT).as_posix()  # its own examples name missing pages on purpose
    missing = [
        _where(name, text, m)
        for name, text in texts.items()
        if name != this and name.endswith((".md", ".py", ".h", ".cpp", ".cu", ".yaml", ".toml", "Makefile"))
        for m in REPO_PATH.finditer(text)
        if m.group(1).startswith("docs/") and not _exists(m.group(1))
    ]
    assert not missing, "docs/ paths that do not exist:\n" + "\n".join(missing)


def _help_texts() -> dict[str, str]:
    parser = build_parser()
    helps = {"rkd": parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                helps[f"rkd {name}"] = sub.format_help()
    return helps


def test_help_texts_name_only_files_a_clone_has():
    helps = _help_texts()
    assert len(helps) > 1, "rkd --help lists no subcommands"
    bad = []
    for command, text in helps.items():
        bad += [f"{command}: {m.group(0)!r} (outside the repository)" for m in OUTSIDE.finditer(text)]
        bad += [f"{command}: {m.group(0)!r} (outside the repository)" for m in CLIMB.finditer(text)]
        bad += [
            f"{command}: {m.group(1)!r} (no such file)" for m in REPO_PATH.finditer(text) if not _exists(m.group(1))
        ]
        for m in re.finditer(r"(?<![\w./-])([\w-]+\.md)\b", text):  # a bare Markdown name: a page of docs/
            if m.group(1) not in WRITTEN and not (_exists(m.group(1)) or _exists(f"docs/{m.group(1)}")):
                bad.append(f"{command}: {m.group(1)!r} (no such page)")
    assert not bad, "help texts name files a clone does not have:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The patterns above find the references they exist to find (a check that cannot fail proves nothing)."""
    assert OUTSIDE.search("see ../shared/METHOD.md section 3")
    assert OUTSIDE.search("the formulas (METHOD.md 2-4)")
    assert not OUTSIDE.search("see docs/loss.md")
    assert [m.group(0) for m in CLIMB.finditer("x ../../notes.txt y")] == ["../../notes.txt"]
    assert [m.group(1) for m in REPO_PATH.finditer("see docs/nope.md, and rkd_engine/cli.py.")] == [
        "docs/nope.md",
        "rkd_engine/cli.py",
    ]
    assert not _exists("docs/nope.md") and _exists("docs/README.md") and _exists("benchmarks/recipes/*.yaml")
    assert not _exists("../README.md", ROOT / "docs" / "..")
    assert [m.group(1) for m in MD_LINK.finditer("[a](docs/x.md#s) ![b](p.png)")] == ["docs/x.md#s", "p.png"]
