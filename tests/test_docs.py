"""The documentation site (mkdocs.yml, docs/) builds in strict mode, and strict mode catches what it should.

``mkdocs build --strict`` fails on a broken link or anchor, a page missing from the nav (or a nav entry without a
page), a cross-reference to a symbol that does not exist, and a config field declared without a doc. The pages
generated at build time (docs/_hooks.py) come from the code, so they cannot drift: the configuration reference
lists every config key. The documentation's Python blocks compile and name things rexrag has. No page, nor the README or
BENCHMARKS.md, cites the project's issue tracker (dates or commits instead). The commands of the pages are checked by tests/test_readme.py.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("mkdocs", reason="the documentation extra is not installed (pip install -e '.[docs]'; make does it)")

ROOT = Path(__file__).resolve().parents[1]
DOC_PAGES = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "docs").rglob("*.md"))}
BUILD_TIMEOUT_S = 240  # ~20 s on 2 busy cores


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT_S)


def test_the_site_builds_in_strict_mode(tmp_path):
    site = tmp_path / "site"
    result = _build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stderr[-4000:]
    from rexrag.config import describe

    reference = (site / "reference" / "configuration" / "index.html").read_text()
    missing = [key for key, _, _ in describe() if key not in reference]
    assert not missing, f"config keys missing from the generated reference: {missing}"
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert all(f"rexrag {name}" in cli for name in ("index", "serve", "train", "eval", "warmup", "demo"))
    assert (site / "benchmarks" / "record" / "index.html").is_file()
    assert (site / "reference" / "api" / "index.html").is_file()


def test_strict_build_fails_on_broken_links_pages_and_symbols(tmp_path):
    """The site's own settings (validation, plugins), on a page with one of each defect."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(
        "# Page\n\n[a broken link](no-such-page.md), [a broken anchor](#no-such-heading), "
        "[a real symbol][rexrag.rewards.exact_match], [a symbol that does not exist][rexrag.rewards.no_such_function]\n\n"
        "::: rexrag.rewards\n")
    (docs / "orphan.md").write_text("# Not in the nav\n")
    config.update(docs_dir=str(docs), nav=[{"Page": "index.md"}, {"Gone": "missing-from-disk.md"}])
    config.pop("hooks", None)
    config.pop("exclude_docs", None)
    config.pop("extra_javascript", None)
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            plugin["mkdocstrings"]["handlers"]["python"]["paths"] = [str(ROOT / "src")]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    for defect in ("no-such-page.md", "no-such-heading", "rexrag.rewards.no_such_function", "missing-from-disk.md",
                   "orphan.md"):
        assert defect in result.stderr, f"strict build did not report {defect}:\n{result.stderr[-3000:]}"
    assert "rexrag.rewards.exact_match" not in result.stderr


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    in_nav = set(pages(config["nav"]))
    on_disk = {str(Path(p).relative_to("docs")) for p in DOC_PAGES}
    assert on_disk <= in_nav, f"pages not in the nav: {sorted(on_disk - in_nav)}"


def _python_blocks():
    for name, text in DOC_PAGES.items():
        for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", text, re.DOTALL | re.MULTILINE)):
            yield pytest.param(name, block, id=f"{name}#{i}")


@pytest.mark.parametrize("page, code", list(_python_blocks()))
def test_python_blocks_compile_and_name_real_things(page, code):
    import rexrag

    tree = ast.parse(code, filename=page)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rexrag"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{page}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("rexrag"):
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "rexrag":
            assert node.attr in dir(rexrag), f"{page}: rexrag has no {node.attr}"


ISSUE_REFERENCE = re.compile(r"(?i)\bissues?\s*#?\d+|\(#\d+\)|\bPR\s*#\d+")


def test_no_page_cites_issue_numbers():
    pages = {**DOC_PAGES, "README.md": (ROOT / "README.md").read_text(), "BENCHMARKS.md": (ROOT / "BENCHMARKS.md").read_text()}
    found = [(name, m.group(0)) for name, text in pages.items() for m in ISSUE_REFERENCE.finditer(text)]
    assert not found, f"cite a date or a commit instead: {found}"
