"""The documentation holds together: README.md and docs/*.md.

(a) every relative link and image resolves to a file (and its #anchor to a heading);
(b) every documented `recon-jax` command line uses only flags its subcommand has, and parses;
(c) README.md stays a front door (at most 12,000 bytes);
(d) no project text cites internal notes or machine paths (the workspace root, the shared folder);
(e) docs/cli.md mentions every flag of every subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from recon_jax.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOC_FILES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_BYTES = 12_000
SUBCOMMANDS = ("train", "reconstruct", "sweep", "evaluate", "study", "identifiability", "datasets")

FENCE = re.compile(r"^(```|~~~)([^\n`]*)\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "zsh"}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ";;", "(", ")"}


def _without_code(text: str) -> str:
    """The Markdown text outside fenced code blocks and inline code spans."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every fenced code block."""
    return [(m.group(2).strip().lower(), m.group(3)) for m in FENCE.finditer(text)]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        slug = _slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _links(path: Path) -> list[str]:
    return LINK.findall(_without_code(path.read_text(encoding="utf-8")))


# ---- (a) links


def test_doc_pages_exist() -> None:
    names = {p.name for p in DOC_FILES}
    for page in ("cli.md", "api.md", "results.md", "kkt.md", "scale.md", "benchmarks.md", "data.md",
                 "architecture.md"):
        assert page in names, f"docs/{page} is missing"


def test_relative_links_and_images_resolve() -> None:
    checked, images, broken = 0, 0, []
    for doc in DOC_FILES:
        for target in _links(doc):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            path_part, _, fragment = target.partition("#")
            resolved = doc if not path_part else (doc.parent / path_part).resolve()
            checked += 1
            where = f"{doc.relative_to(ROOT)}: ({target})"
            if not resolved.exists():
                broken.append(f"{where} -> {resolved} does not exist")
                continue
            if path_part.lower().endswith((".png", ".jpg", ".jpeg", ".svg", ".gif")):
                images += 1
            if fragment and resolved.suffix == ".md" and fragment.lower() not in _anchors(resolved):
                broken.append(f"{where} -> no heading with anchor #{fragment} in {resolved.name}")
    assert not broken, "broken links:\n" + "\n".join(broken)
    assert checked >= 20, f"only {checked} relative links found: is the link pattern still right?"
    assert images >= 1, "no image link found in README.md or docs/"


def test_readme_shows_a_figure_from_docs() -> None:
    images = [t for t in _links(README) if t.endswith(".png")]
    assert images and all((ROOT / t).is_file() for t in images), images


# ---- (b) commands


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("recon-jax has no subcommands")


def _option_strings(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def _command_lines(text: str) -> list[str]:
    """Logical lines of the shell-like fenced blocks, backslash continuations joined."""
    lines = []
    for info, body in _fenced_blocks(text):
        lang = info.split()[0] if info else ""
        if lang not in SHELL_LANGS:
            continue
        current = ""
        for raw in body.splitlines():
            line = raw.rstrip()
            if line.endswith("\\"):
                current += line[:-1] + " "
                continue
            lines.append(current + line)
            current = ""
        if current:
            lines.append(current)
    return lines


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _segments(tokens: list[str]) -> list[list[str]]:
    """Split at shell operators and redirections: one simple command each."""
    segments, current = [], []
    for token in tokens:
        if token in SHELL_OPERATORS or re.fullmatch(r"[0-9]*[<>]+&?", token):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    return [s for s in segments if s]


def _recon_jax_args(segment: list[str]) -> list[str] | None:
    """The arguments after `recon-jax` (also `.venv/bin/recon-jax`, `python -m recon_jax`), or None."""
    for i, token in enumerate(segment):
        if token == "recon-jax" or token.endswith("/recon-jax"):
            return segment[i + 1:]
        if re.fullmatch(r"(.*/)?python3?(\.\d+)?", token) and segment[i + 1:i + 3] == ["-m", "recon_jax"]:
            return segment[i + 3:]
    return None


def _check_command(parser, subparsers, args: list[str]) -> list[str]:
    """Problems with one recon-jax command line: unknown subcommand or flag, or argparse's own error."""
    top = _option_strings(parser)
    rest = list(args)
    while rest and rest[0].startswith("-"):
        if rest[0] not in top:
            return [f"unknown top-level option {rest[0]}"]
        rest.pop(0)
    if not rest or rest[0] not in subparsers:
        return [f"unknown or missing subcommand {rest[:1]} (known: {', '.join(subparsers)})"]
    command, options = rest[0], _option_strings(subparsers[rest[0]])
    problems = []
    skip_value = False
    for token in rest[1:]:
        if skip_value:
            skip_value = False
            continue
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            action = options.get(name)
            if action is None:  # exact names only: argparse would also accept an abbreviation
                problems.append(f"`{command}` has no flag {name}")
                continue
            skip_value = action.nargs != 0 and "=" not in token
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            parser.parse_args(args)
        except SystemExit as exit_:
            if exit_.code:
                problems.append(stderr.getvalue().strip().splitlines()[-1])
    return problems


def test_documented_commands_use_real_flags() -> None:
    parser = build_parser()
    subparsers = _subparsers(parser)
    assert set(SUBCOMMANDS) <= set(subparsers), sorted(subparsers)
    checked, seen, problems = 0, set(), []
    for doc in DOC_FILES:
        for line in _command_lines(doc.read_text(encoding="utf-8")):
            try:
                tokens = _tokens(line)
            except ValueError as err:  # unbalanced quotes: not a shell line
                problems.append(f"{doc.relative_to(ROOT)}: {line.strip()}\n    {err} (mark a non-shell block ```text)")
                continue
            for segment in _segments(tokens):
                args = _recon_jax_args(segment)
                if args is None:
                    continue
                checked += 1
                seen.update(a for a in args[:2] if a in subparsers)
                problems += [f"{doc.relative_to(ROOT)}: {line.strip()}\n    {p}"
                             for p in _check_command(parser, subparsers, args)]
    assert not problems, "documented commands that do not parse:\n" + "\n".join(problems)
    assert checked >= 30, f"only {checked} recon-jax command lines found in fenced blocks"
    assert seen == set(SUBCOMMANDS), f"subcommands never shown in a command block: {set(SUBCOMMANDS) - seen}"


@pytest.mark.parametrize("line, expected", [
    ("recon-jax train --out D", None),
    ("recon-jax train --no-such-flag 1 --out D", "no flag --no-such-flag"),
    ("recon-jax reconstruct --victim V --n-init 4 --out D", "no flag --n-init"),  # an abbreviation
    ("recon-jax train --solver sgd --out D", "invalid choice"),
    ("recon-jax bogus --x", "unknown or missing subcommand"),
    ("RECON_JAX_DATA=/d .venv/bin/recon-jax study --set n_inits=2 --set \"inits=['gaussian:0.1']\"", None),
])
def test_command_checker_catches_bad_flags(line: str, expected: str | None) -> None:
    parser = build_parser()
    text = f"```bash\n{line}\n```\n"
    [segment] = [s for l in _command_lines(text) for s in _segments(_tokens(l))]
    problems = _check_command(parser, _subparsers(parser), _recon_jax_args(segment))
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_continuations_are_joined() -> None:
    text = "```bash\nrecon-jax train --dataset mnist \\\n  --out D   # comment\npython -m recon_jax datasets\n```\n"
    lines = _command_lines(text)
    assert len(lines) == 2 and "--dataset mnist" in lines[0] and "--out D" in lines[0]
    assert [_recon_jax_args(s) for l in lines for s in _segments(_tokens(l))] == [
        ["train", "--dataset", "mnist", "--out", "D"], ["datasets"]]


# ---- (c) size


def test_readme_is_a_front_door() -> None:
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail into docs/ (limit {README_MAX_BYTES})"
    text = README.read_text(encoding="utf-8")
    for must in ("## Quickstart", "## Python API", "## Module map", "Runkel et al. 2024"):
        assert must in text, must


# ---- (d) self-contained text

FORBIDDEN = (
    # The notes' name and the workspace root are spelled in pieces so that `git grep` for them
    # finds no project text, this file included.
    (re.compile(r"\b" + "BRI" + "EF" + r"\b"), "cites internal notes: cite the paper instead"),
    (re.compile(re.escape("/" + "work/")), "holds a machine path (the workspace root)"),
    (re.compile(re.escape("../shared")), "holds a machine path (../shared): use RECON_JAX_DATA=/path/to/data"),
)
SCANNED = ("README.md", "docs", "recon_jax", "experiments", "benchmarks")
BINARY_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".npz", ".npy", ".msgpack", ".pyc", ".whl", ".gz"}


def _project_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files under SCANNED (a directory walk without git)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SCANNED],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = [ROOT / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):
        files = [p for name in SCANNED for p in ([ROOT / name] if (ROOT / name).is_file()
                                                  else (ROOT / name).rglob("*"))
                 if p.is_file() and "__pycache__" not in p.parts]
    return [p for p in files if p.is_file() and p.suffix.lower() not in BINARY_SUFFIXES]


def test_no_internal_notes_or_machine_paths() -> None:
    files = _project_files()
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert "README.md" in names and "recon_jax/cli.py" in names and any(n.startswith("docs/") for n in names)
    hits = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for pattern, why in FORBIDDEN:
                if pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {why}: {line.strip()}")
    assert not hits, "\n".join(hits)


# ---- (e) the CLI page is complete


def test_cli_page_mentions_every_flag() -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    missing = []
    for name, sub in _subparsers(build_parser()).items():
        assert f"## `recon-jax {name}`" in text, f"docs/cli.md has no section for `recon-jax {name}`"
        for option in _option_strings(sub):
            if option.startswith("--") and option != "--help" and not re.search(
                    rf"(?<![\w-]){re.escape(option)}(?![\w-])", text):
                missing.append(f"{name} {option}")
    assert not missing, "flags not documented in docs/cli.md: " + ", ".join(missing)


# ---- (f) names the docs cite exist


def _recon_jax_modules() -> list[str]:
    import pkgutil

    import recon_jax

    return sorted(m.name for m in pkgutil.iter_modules(recon_jax.__path__))


FILE_SUFFIXES = {"py", "json", "npz", "npy", "msgpack", "md", "csv", "toml", "png", "txt", "whl"}


def _resolve(dotted: str) -> bool:
    """Whether ``recon_jax.<dotted>`` names a module or an attribute (a file name is not checked)."""
    import importlib

    parts = dotted.split(".")
    obj = importlib.import_module(f"recon_jax.{parts[0]}")
    for part in parts[1:]:
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        except (AttributeError, ImportError):
            return False
    return True


def test_cited_library_names_exist() -> None:
    modules = _recon_jax_modules()
    reference = re.compile(r"(?<![\w./-])(?:recon_jax\.)?((?:%s)(?:\.[A-Za-z_]\w*)+)"
                           % "|".join(sorted(modules, key=len, reverse=True)))
    checked, missing = 0, []
    for doc in DOC_FILES:
        for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", doc.read_text(encoding="utf-8"))):
            for dotted in reference.findall(span):
                if dotted.rsplit(".", 1)[1] in FILE_SUFFIXES:  # victim.json, report.md, ...
                    continue
                checked += 1
                if not _resolve(dotted):
                    missing.append(f"{doc.relative_to(ROOT)}: `{span}` names recon_jax.{dotted}, which does not exist")
    assert not missing, "\n".join(missing)
    assert checked >= 30, f"only {checked} library names checked"


def test_readme_module_map_lists_every_module() -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Module map"):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    missing = [m for m in _recon_jax_modules() if f"`{m}`" not in section and f"`{m}/`" not in section]
    assert not missing, f"README's module map lacks: {', '.join(missing)}"
