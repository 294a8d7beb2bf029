"""The docs: generated references match the code, the README fits on a screen, every link and option is real.

None of this needs mkdocs: the same checks run in the test suite before `.ci/run` builds the site.
"""
from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_LIMIT = 15_000  # bytes: the manual lives in docs/, the README is what a newcomer reads first
PAGES = [README, *sorted(DOCS.rglob("*.md"))]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _prose(text: str) -> str:
    """The text with fenced code blocks blanked out (links and headings in code are not links)."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.DOTALL | re.MULTILINE)


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (what mkdocs uses for anchors), from a heading's markdown."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"[`*_]{1,2}(?=\S)|(?<=\S)[`*]{1,2}", "", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _prose(path.read_text(encoding="utf-8")), flags=re.MULTILINE):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}_{n}")
    return out


def test_generated_references_match_the_code():
    stale = []
    for path, text in _generator().render().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            stale.append(_rel(path))
    assert not stale, (f"{', '.join(stale)} out of date with the code (config schema, CLI or fix catalogue): "
                       "run python docs/gen_reference.py and commit the result")


def test_generated_references_cover_every_key_option_and_fix():
    gen = _generator()
    config_page, cli_page = gen.config_md(), gen.cli_md()
    fixes_page, thresholds_page = gen.fixes_md(), gen.thresholds_md()
    config = gen._module("nanprobe.io.config", "nanprobe.config")
    for spec in config.schema():
        assert f"`{spec.key}`" in config_page
    fixes = gen._module("nanprobe.analysis.fixes", "nanprobe.fixes")
    for fid in fixes.REGISTRY:
        assert f"## {fid}\n" in fixes_page
    for command in ("diagnose", "compare-precisions", "check-data", "init"):
        assert f"## nanprobe {command}\n" in cli_page
    thresholds = gen._module("nanprobe.thresholds")
    for name in [n for n in vars(thresholds) if n.isupper()]:
        assert f"`{name}`" in thresholds_page, f"{name} in nanprobe/thresholds.py has no docstring under it"


def test_every_config_key_and_fix_is_described():
    # The reference is only as good as the docstrings and descriptions it is generated from.
    gen = _generator()
    config = gen._module("nanprobe.io.config", "nanprobe.config")
    missing = []
    for spec in config.schema():
        if not gen.field_docs(spec.owner).get(spec.name):
            missing.append(f"{spec.key}: no docstring under the field of {spec.owner.__name__}")
        if not spec.expects:
            missing.append(f"{spec.key}: its check does not say what it accepts (mark it with _expects(...) "
                           "in the config module)")
    fixes = gen._module("nanprobe.analysis.fixes", "nanprobe.fixes")
    missing += [f"fix {fid}: no when=... (the findings it applies to, in words)"
                for fid, fix in fixes.REGISTRY.items() if not getattr(fix, "when", "")]
    assert not missing, "; ".join(missing)


def test_readme_fits_on_a_screen():
    size = len(README.read_bytes())
    assert size <= README_LIMIT, (f"README.md is {size} bytes, over {README_LIMIT}: move the detail into a page "
                                  "under docs/ and link it")


def test_readme_set_up_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    blocks = [b.strip() for b in _code_blocks(README.read_text(encoding="utf-8"))]
    tests = [b for b in blocks if "pytest" in b]
    assert tests, "README.md has no test command"
    assert tests[0] in ci.splitlines(), f"README's test command {tests[0]!r} is not a line of .ci/run"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {_rel(dest)})")
    assert not broken, f"{_rel(page)}: broken links: " + "; ".join(broken)


def _commands(text: str):
    """(command, [--options]) for each `nanprobe COMMAND ...` line in the code blocks and inline code."""
    lines = []
    for block in _code_blocks(text):
        for line in block.splitlines():
            if lines and re.match(r"\s+\[?--", line):  # a usage line wrapped onto the next
                lines[-1] += " " + line
            else:
                lines.append(line)
    lines += re.findall(r"`(nanprobe [^`]+)`", _prose(text))
    for line in lines:
        m = re.match(r"\s*(?:\$ )?(?:python -m )?nanprobe ([a-z][a-z-]*)(.*)", line)
        if m:
            body = m.group(2).split("#")[0]
            yield m.group(1), re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*|-[a-zA-Z])\b", body)


def test_docs_name_only_real_commands_and_options():
    import typer

    from nanprobe.cli import app

    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="nanprobe")
    known = {}
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        known[name] = ({o for p in cmd.params if p.param_type_name == "option" and not getattr(p, "hidden", False)
                        for o in [*p.opts, *p.secondary_opts]} | {"--help"},
                       {o for p in cmd.params if p.param_type_name == "option" and getattr(p, "hidden", False)
                        for o in [*p.opts, *p.secondary_opts]})
    wrong = []
    for page in PAGES:
        for command, options in _commands(page.read_text(encoding="utf-8")):
            if command not in known:
                wrong.append(f"{_rel(page)}: nanprobe {command} is not a command")
                continue
            shown, hidden = known[command]
            for option in options:
                if option in hidden:
                    wrong.append(f"{_rel(page)}: nanprobe {command} {option} is a hidden alias; name the option "
                                 "that --help shows")
                elif option not in shown:
                    wrong.append(f"{_rel(page)}: nanprobe {command} has no option {option}")
    assert not wrong, "\n".join(wrong)



@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_repository_paths_named_in_prose_exist(page):
    # A file moved by a restructure leaves `tests/test_x.py` behind in the docs unless something checks it.
    named = re.findall(r"`((?:tests|configs|benchmarks|examples|nanprobe|docs)/[\w/.-]+\.(?:py|yaml|yml|md|npy|pt))",
                       _prose(page.read_text(encoding="utf-8")))
    missing = sorted({p for p in named if "X" not in p and not (ROOT / p).exists()})
    assert not missing, f"{_rel(page)} names files that do not exist: {', '.join(missing)}"


def test_every_page_is_in_the_site_nav():
    import yaml

    def pages(nav):
        for item in nav:
            for value in (item.values() if isinstance(item, dict) else [item]):
                yield from (pages(value) if isinstance(value, list) else [value])

    site = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    listed = set(pages(site["nav"]))
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not on_disk - listed, f"pages missing from mkdocs.yml's nav: {', '.join(sorted(on_disk - listed))}"
    assert not listed - on_disk, f"nav entries with no page: {', '.join(sorted(listed - on_disk))}"
