"""The README's commands run as written: each ``rexrag ...`` command in its code (fenced blocks and
inline spans) and in the subcommands' ``--help`` examples names a real subcommand and real flags, the
fenced ones parse with the real argparse parser, ``key=value`` overrides name real config fields,
repository files they name exist, and ``runs/demo/...`` paths are ones ``rexrag demo`` writes.
Nothing is run: the parser only parses.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from rexrag.cli import build_parser
from rexrag.config import describe

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SHELL_OPERATORS = {"&", "&&", "|", "||", ";", ">", ">>", "2>&1"}
CONFIG_KEYS = {key for key, _, _ in describe()}


def _tokens(line: str, env: dict[str, str]) -> list[str] | None:
    """The arguments after ``rexrag`` (or ``-m rexrag.cli``) on one shell line, else None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, w in enumerate(words):
        if w in SHELL_OPERATORS:
            words = words[:i]
            break
    words = [
        re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), w) for w in words
    ]
    for i, w in enumerate(words):
        if (
            w == "rexrag"
            and i == 0
            or w == "rexrag.cli"
            and i > 0
            and words[i - 1] == "-m"
        ):
            return words[i + 1 :]
    return None


def _fenced() -> list[tuple[str, list[str]]]:
    out = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", README, re.DOTALL | re.MULTILINE):
        env = dict(re.findall(r"^(\w+)=(\S+)", block, re.MULTILINE))
        for line in block.replace("\\\n", " ").splitlines():
            tokens = _tokens(line, env)
            if tokens is not None:
                out.append((line.strip(), tokens))
    return out


def _inline() -> list[tuple[str, list[str]]]:
    spans = re.findall(r"(?<!`)`([^`\n]*rexrag[^`\n]*)`(?!`)", README)
    out = [(s, t) for s in spans if (t := _tokens(s, {})) is not None]
    # `make demo ARGS=...` runs `rexrag demo ...` (Makefile)
    out += [
        (f"make demo ARGS={a}", ["demo", *shlex.split(a)])
        for a in re.findall(r"make demo ARGS=(\S+?)`", README)
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


FENCED, INLINE, HELP_EXAMPLES = _fenced(), _inline(), _help_examples()


def test_the_readme_has_commands_to_check():
    subcommands = {t[0] for _, t in FENCED if t}
    assert {"index", "serve", "warmup", "train", "eval"} <= subcommands
    assert INLINE and HELP_EXAMPLES


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
    texts = README + "".join(sub.epilog or "" for sub in _subparsers().values())
    named = set(re.findall(r"runs/demo/([\w./-]*\w)", texts))
    assert named, "expected the README or --help to name demo outputs"
    assert named <= written, f"not written by `rexrag demo`: {sorted(named - written)}"
