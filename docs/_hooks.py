"""MkDocs hooks: pages generated from the code and from BENCHMARKS.md at build time, so they cannot drift.

- ``reference/configuration.md``: every field of the typed config (``rexrag.config``), its type, default and
  the doc text it is declared with (``doc(text, default)``). A field declared without a doc is a build warning,
  so a strict build fails on it.
- ``reference/cli.md``: each subcommand's ``--help`` from the real argparse parser.
- ``reference/api/index.md``: the top-level exports (``rexrag._EXPORTS``), each a cross-reference to its
  documented object (a removed or renamed export fails the strict build).
- ``benchmarks/record.md``: BENCHMARKS.md as it is, with the files it links to (plots) copied beside it; a link to
  a file that does not exist fails the strict build.

And one cosmetic pass: Sphinx roles in docstrings (``:func:`name```) are shown as the code span alone.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import logging
import os
import re
import sys
import typing
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
log = logging.getLogger("mkdocs.hooks.rexrag")

# --------------------------------------------------------------------------- helpers


def _import_rexrag():
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    import rexrag  # noqa: F401 (light: the exports load on first use)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (pipes escaped, no raw HTML tags, one line)."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    return text.replace("|", "\\|")


def _code_cell(text: str) -> str:
    """A code span for a table cell: pipes inside a code span do not split the cell, and are not escaped."""
    text = " ".join(str(text).split())
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}"


def _type_name(tp) -> str:
    name = getattr(tp, "__name__", None)
    if name and not typing.get_args(tp):
        return name
    return str(tp).replace("typing.", "")


def _default(value) -> str:
    return _code_cell(f'"{value}"' if isinstance(value, str) else repr(value))


# --------------------------------------------------------------------------- configuration reference


def _section_rows(cls, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    instance = cls()
    rows = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += _section_rows(tp, f"{prefix}{f.name}.")
            continue
        text = f.metadata.get("doc", "")
        if not text:
            log.warning("config field %s%s has no doc(...) text: declare it with rexrag.config.doc", prefix, f.name)
        rows.append(f"| `{prefix}{f.name}` | {_code_cell(_type_name(tp))} | {_default(getattr(instance, f.name))} "
                    f"| {_cell(text)} |")
    return rows


def configuration_md() -> str:
    _import_rexrag()
    from rexrag import config as C

    lines = [
        "# Configuration reference",
        "",
        "Generated at build time from the typed config itself (`rexrag.config`: every field is declared once with",
        "`doc(text, default)`), so it is what the code accepts. The same list prints with",
        "`rexrag train --help-config`. A run is a YAML recipe plus dotted overrides",
        "(`rexrag train --config configs/demo_cpu.yaml trainer.steps=20`); an unknown key or a value of the wrong",
        "type is an error naming the key and what is allowed, and cross-field rules (each section's",
        "`__post_init__`) say what to change. Lists on the command line are comma-separated",
        "(`data.train_files=a.parquet,b.parquet`).",
        "",
    ]
    hints = typing.get_type_hints(C.Config)
    for f in dataclasses.fields(C.Config):
        cls = hints[f.name]
        lines += [f"## `{f.name}`", "", inspect.getdoc(cls) or "", "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += _section_rows(cls, f"{f.name}.")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI reference


def cli_md() -> str:
    _import_rexrag()
    import argparse

    os.environ.setdefault("COLUMNS", "110")
    from rexrag.cli import build_parser

    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    lines = ["# Command line", "",
             "Generated at build time from the real parser (`rexrag.cli.build_parser`): each subcommand's `--help`.", "",
             "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in action.choices.items():
        lines += [f"## `rexrag {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- API index


def api_index_md() -> str:
    _import_rexrag()
    import rexrag

    lines = ["# Top-level exports", "",
             "`import rexrag` stays light (no torch, no transformers): each name below is imported from its module on",
             "first use (`rexrag.Trainer`, `from rexrag import Trainer`). Generated from the package's own export",
             "table, each linked to its documentation.", "",
             "| name | defined in |", "|---|---|"]
    for name, module in sorted(rexrag._EXPORTS.items()):
        lines.append(f"| [`{name}`][{module}.{name}] | `{module}` |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- benchmark record

_LINK = re.compile(r"\]\(([^)\s#]+)(#[^)\s]*)?\)")


def benchmarks_record(config) -> tuple[str, list[File]]:
    text = (ROOT / "BENCHMARKS.md").read_text()
    extra = []
    for target in sorted({m.group(1) for m in _LINK.finditer(text)}):
        if "://" in target or target.startswith("mailto:"):
            continue
        path = ROOT / target
        if path.is_file():  # served beside the record page, at the same relative path
            extra.append(File.generated(config, f"benchmarks/{target}", abs_src_path=str(path)))
    note = ("!!! note \"This page is BENCHMARKS.md\"\n    Rendered from the repository's `BENCHMARKS.md` at build "
            "time. The latest figure of each benchmark, with its command, machine and date, is summarised in "
            "[Latest figures](../benchmarks.md).\n\n")
    title, _, rest = text.partition("\n")
    return f"{title}\n\n{note}{rest}", extra


# --------------------------------------------------------------------------- the hook

_SPHINX_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj):(?=<code>)")


def on_page_content(html_text, page, config, files):
    """Docstrings use Sphinx roles (:func:`name`); show just the code span."""
    return _SPHINX_ROLE.sub("", html_text)



def on_files(files, config):
    generated = {
        "reference/configuration.md": configuration_md(),
        "reference/cli.md": cli_md(),
        "reference/api/index.md": api_index_md(),
    }
    record, extra = benchmarks_record(config)
    generated["benchmarks/record.md"] = record
    for uri, content in generated.items():
        files.append(File.generated(config, uri, content=content))
    for f in extra:
        files.append(f)
    return files
