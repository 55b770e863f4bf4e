"""README.md's and docs/*.md's checkable facts against the code they describe: links (paths and
anchors), the recipe and limits tables, the encoder list, config field names, the demo's defaults, the
options they give benchmark scripts, and the helper files README's Layout names. Each of these was
written once by hand and drifts silently when the code changes; the examples themselves run in
test_readme_examples.py. A fact is checked on whichever page holds it (tests/doc_pages.py)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from doc_pages import FENCED, PAGES, ROOT, TEXT, anchors, relative_links, section as _section


def _code_spans() -> list[str]:
    """Inline code and the lines of fenced blocks (continuation lines joined, comments cut)."""
    spans = []
    for block in re.findall(r"^```\w*\n(.*?)^```", TEXT, flags=re.MULTILINE | re.DOTALL):
        spans += [line.split(" #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    prose = FENCED.sub("", TEXT)
    return spans + [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]


def test_every_relative_link_exists():
    """Every relative link of every page names a file in the tree, relative to the page, and an
    anchor (``page.md#section``, ``#section``) that a heading of the linked page gives."""
    checked, missing = 0, []
    for page, text in PAGES.items():
        for target in relative_links(text):
            path, _, anchor = target.partition("#")
            resolved = (ROOT / page).parent / path if path else ROOT / page
            checked += 1
            if not resolved.exists() or ROOT.resolve() not in resolved.resolve().parents:
                missing.append(f"{page}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
                missing.append(f"{page}: {target} (no such heading)")
    assert checked > 50, "the parsing above no longer finds the pages' links"
    assert not missing, f"links to paths or headings that are not there: {missing}"


def test_every_docs_page_is_listed_in_the_docs_index_and_the_index_linked_from_readme():
    """A page under docs/ that nothing leads to is one a newcomer never finds."""
    docs = sorted(Path(p).name for p in PAGES if p.startswith("docs/") and p != "docs/README.md")
    assert len(docs) >= 8, "the reference pages are no longer found under docs/"
    listed = {t.partition("#")[0] for t in relative_links(PAGES["docs/README.md"])}
    assert sorted(set(docs) - listed) == []
    assert "docs/README.md" in {t.partition("#")[0] for t in relative_links(PAGES["README.md"])}


def test_recipe_table_lists_exactly_the_built_in_recipes():
    pytest.importorskip("torch")
    from pneumoseg.train.config import list_recipes

    table = set(re.findall(r"^\| `([\w-]+)` \|", _section("Training"), flags=re.MULTILINE))
    assert table == set(list_recipes())


def test_encoder_list_and_count_match_the_registry():
    pytest.importorskip("torch")
    from pneumoseg.models import list_encoders
    from pneumoseg.models.encoders import ENCODERS

    models = _section("Models")
    paragraph = models[models.index("Encoders (`list_encoders()`)"):].split("\n\n")[0]
    names = set()
    for first, last in re.findall(r"`(\w+?)`(?:\.\.`(\w+)`)?", paragraph):
        if last:  # `efficientnet_b0`..`b4`
            stem, start = re.fullmatch(r"(\w+_b)(\d+)", first).groups()
            names |= {f"{stem}{i}" for i in range(int(start), int(last[1:]) + 1)}
        else:
            names.add(first)
    names.discard("list_encoders")
    assert names == set(list_encoders())

    total, timm = map(int, re.search(r"(\d+) encoders \((\d+) identical to timm's\)", TEXT).groups())
    assert total == len(list_encoders())
    assert timm == sum(spec.timm_name is not None for spec in ENCODERS.values())


def _limit_value(text: str) -> int:
    text = text.split("(")[0].strip()
    if m := re.fullmatch(r"(\d+) GiB", text):
        return int(m.group(1)) * 2**30
    if m := re.fullmatch(r"2\^(\d+)", text):
        return 2 ** int(m.group(1))
    return int(text.replace(",", ""))


def test_limits_table_gives_the_defaults():
    from pneumoseg.limits import Limits

    rows = re.findall(r"^\| `(max_\w+)` \| ([^|]+) \|", TEXT, flags=re.MULTILINE)
    table = {name: _limit_value(value) for name, value in rows}
    assert table == {f.name: f.default for f in dataclasses.fields(Limits)}
    for value in (v for _, v in rows if "²" in v):  # "2^28 (16384²)": the two spellings agree
        side = int(re.search(r"\((\d+)²\)", value).group(1))
        assert side * side == _limit_value(value)


def test_every_config_field_readme_names_exists():
    pytest.importorskip("torch")
    from pneumoseg.train.config import StageConfig, TrainConfig

    def fields(cls, prefix=""):
        """Dotted names of a config dataclass; sections are fields whose default is a dataclass."""
        out = set()
        for f in dataclasses.fields(cls):
            out.add(prefix + f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                out |= fields(type(default), f"{prefix}{f.name}.")
        return out

    known = fields(TrainConfig) | fields(StageConfig, "stages.N.")  # stages is a list: README writes stages.0
    sections = "data|model|loss|optimizer|scheduler|augment|validation|checkpoint|log|stages"
    named = set(re.findall(rf"`((?:{sections})\.[a-z_0-9.]*[a-z_0-9])`", TEXT))
    named |= set(re.findall(r"--set ([a-z_][\w.]*)=", TEXT))
    assert len(named) > 10  # the parsing above still finds README's fields
    unknown = sorted(n for n in named if re.sub(r"^stages\.\d+\.", "stages.N.", n) not in known)
    assert not unknown, f"README names config fields that do not exist: {unknown}"


def test_demo_defaults_are_the_ones_readme_states():
    from pneumoseg.cli import build_parser

    import argparse

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    demo = commands.choices["demo"]
    defaults = {a.dest: a.default for a in demo._actions}
    quick = _section("Quick start")
    train, held_out = map(int, re.search(r"\((\d+) training and (\d+) held-out", quick).groups())
    assert (train, held_out) == (defaults["n"], defaults["held_out"])
    assert re.search(r"It writes `([\w-]+)/` \(`--out` to change\)", quick).group(1) == defaults["out"]


def test_every_option_readme_gives_a_benchmark_script_exists():
    """`python benchmarks/x.py --option` or `x.py --option`: the option is one the script (or the
    host_profile module its profilers share) defines."""
    checked = 0
    for span in (part.strip() for text in _code_spans() for part in re.split(r"&&|;", text)):
        m = re.match(r"(?:python3? )?(?:benchmarks/)?(\w+\.py)\b(.*)", span)
        if m is None or not (ROOT / "benchmarks" / m.group(1)).is_file():
            continue
        source = (ROOT / "benchmarks" / m.group(1)).read_text(encoding="utf-8")
        if "host_profile" in source:
            source += (ROOT / "benchmarks" / "host_profile.py").read_text(encoding="utf-8")
        for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", m.group(2)):
            assert f'"{option}"' in source or f"'{option}'" in source, \
                f"README: `{span}`: {m.group(1)} has no option {option}"
            checked += 1
    assert checked >= 8  # the parsing above still finds README's script commands


def test_layout_names_every_helper_file():
    """A helper script in benchmarks/ or a helper module in tests/ that README's Layout never names is
    one a newcomer cannot find (test and benchmark files are found by their prefix)."""
    helpers = [p for p in (*ROOT.glob("benchmarks/*.py"), *ROOT.glob("benchmarks/*.sh"), *ROOT.glob("tests/*.py"))
               if not p.name.startswith(("test_", "bench_", "__init__"))]
    assert len(helpers) > 20
    unnamed = sorted(str(p.relative_to(ROOT)) for p in helpers if p.name not in _section("Layout"))
    assert not unnamed, f"README's Layout does not name: {unnamed}"
