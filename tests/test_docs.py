"""The docs site: built for real with C{mkdocs build --strict}, its
generated configuration reference checked against a real
C{twistd lineserver --help}, its drawings against the code, and its
navigation against the pages in docs/."""

# trial's assertion methods carry no annotations; checking their calls
# would only add noise, everything else stays strict.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mkdocs.config import load_config
from twisted.trial.unittest import SynchronousTestCase

from lineserver._docs import (
    SUPERVISION_DOT,
    option_rows,
    reference_markdown,
    state_machine_dot,
)
from lineserver.session import TRANSITIONS, Event, Phase
from tests.support import TWISTD, temp_dir

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).parent / "mkdocs"
#: Pages the build generates (docs/hooks.py), in the nav but not in docs/.
GENERATED_PAGES = {"reference.md"}
#: An option's first line in twistd's --help: "  -m, --mode=   text".
HELP_OPTION = re.compile(r"^\s+(?:-\w, )?--([\w-]+)=?\s+(.*)$")


def compact(text: str) -> str:
    """
    Text without its whitespace: --help wraps lines (even inside a
    hyphenated word), the reference does not.
    """
    return "".join(text.split())


def twistd_help() -> dict[str, str]:
    """
    @return: each option of a real C{twistd lineserver --help}, with its
        help text (continuation lines joined).
    """
    result = subprocess.run(
        [str(TWISTD), "lineserver", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise AssertionError(f"--help exited {result.returncode}: {result.stderr}")
    options: dict[str, str] = {}
    current: str | None = None
    for line in result.stdout.splitlines():
        found = HELP_OPTION.match(line)
        if found:
            current = found.group(1)
            options[current] = found.group(2)
        elif current is not None and line.startswith(" " * 10) and line.strip():
            options[current] += " " + line.strip()
        else:
            current = None
    return options


def nav_pages(nav: list[object]) -> set[str]:
    pages: set[str] = set()
    for entry in nav:
        if isinstance(entry, str):
            pages.add(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                pages |= nav_pages(value if isinstance(value, list) else [value])
    return pages


def site_nav() -> list[object]:
    """
    @return: mkdocs.yml's nav, as MkDocs reads it.
    """
    config = load_config(str(ROOT / "mkdocs.yml"))
    nav: list[object] = config.nav or []
    return nav


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=config.parent,
    )


class ReferenceTests(SynchronousTestCase):
    def test_every_option_of_help_with_its_default(self) -> None:
        """
        The generated reference has exactly the options a real
        C{twistd lineserver --help} shows, each with the help text it
        shows, and the default it shows as C{[default: X]}.
        """
        shown = twistd_help()
        rows = {row.name: row for row in option_rows()}
        self.assertEqual(set(rows), set(shown))
        page = reference_markdown()
        for name, text in shown.items():
            row = rows[name]
            self.assertTrue(compact(text).startswith(compact(row.help)), name)
            declared = re.search(r"\[default: ([^\]]+)\]$", " ".join(text.split()))
            if declared is not None:
                self.assertEqual(compact(declared.group(1)), compact(row.default or ""))
            self.assertEqual(
                len(re.findall(rf"^\| `--{name}(?:=VALUE)?`", page, re.MULTILINE)),
                1,
                f"--{name}: not exactly one row",
            )
        self.assertIn("| `--mode=VALUE`, `-m` | `sink` |", page)
        self.assertIn("| `--starttls` | `off` |", page)

    def test_help_text_is_literal(self) -> None:
        """
        Help text that Markdown would read as markup (a pipe, which would
        split the table row; C{<token>}, which would vanish as a tag) is
        escaped.
        """
        page = reference_markdown()
        sink = next(line for line in page.splitlines() if "`--sink=" in line)
        self.assertIn(r"never\|batch\|interval", sink)
        self.assertEqual(len(re.split(r"(?<!\\)\|", sink)), 5)
        self.assertIn("AUTH &lt;token&gt;", page)


class DrawingTests(SynchronousTestCase):
    def test_state_machine_is_the_transition_table(self) -> None:
        """
        The drawing has one arrow per move of L{TRANSITIONS} (close and
        lost once, from "any phase"), and nothing else.
        """
        arrows = set(
            re.findall(
                r'"([\w -]+)" -> "([\w-]+)" \[label="([\w-]+)"', state_machine_dot()
            )
        )
        expected = {
            (phase.value, target.value, event.value)
            for (phase, event), target in TRANSITIONS.items()
            if event not in (Event.CLOSE, Event.LOST)
        }
        expected |= {
            ("any phase", Phase.CLOSING.value, Event.CLOSE.value),
            ("any phase", Phase.CLOSED.value, Event.LOST.value),
        }
        self.assertEqual(arrows, expected)

    def test_supervision_tree_names_real_classes(self) -> None:
        """
        Each class the supervision tree drawing names is in the module it
        names.
        """
        named = re.findall(r"\\n(\w+), \w+\\n(lineserver[.\w]+)", SUPERVISION_DOT)
        self.assertEqual(len(named), 8)
        for name, module in named:
            self.assertTrue(
                hasattr(importlib.import_module(module), name), f"{module}.{name}"
            )


class SiteTests(SynchronousTestCase):
    def test_every_page_is_in_the_nav(self) -> None:
        """
        Every page in docs/ (and every generated one) is in mkdocs.yml's
        nav, so every page is reachable from the index; and the nav names
        no page that does not exist.
        """
        nav = site_nav()
        pages = {path.name for path in DOCS.glob("*.md")} | GENERATED_PAGES
        self.assertEqual(nav_pages(nav), pages)
        self.assertEqual(nav[0], {"Home": "index.md"})

    def test_strict_build(self) -> None:
        """
        C{mkdocs build --strict} succeeds; the site has the generated
        reference with every option, and the two drawings (SVG made by
        Graphviz) on the architecture page.
        """
        site = Path(temp_dir(self)) / "site"
        result = build(ROOT / "mkdocs.yml", site)
        self.assertEqual(result.returncode, 0, result.stderr)
        reference = (site / "reference" / "index.html").read_text()
        for row in option_rows():
            self.assertIn(f"--{row.name}", reference)
        architecture = (site / "architecture" / "index.html").read_text()
        for drawing in ("supervision-tree.svg", "connection-states.svg"):
            self.assertIn(f'src="../drawings/{drawing}"', architecture)
            svg = (site / "drawings" / drawing).read_text()
            self.assertIn("<svg", svg)
        states = (site / "drawings" / "connection-states.svg").read_text()
        for phase in Phase:
            self.assertIn(f"<title>{phase.value}</title>", states)
        index = (site / "index.html").read_text()
        for page in nav_pages(site_nav()):
            if page != "index.md":
                self.assertIn(f'href="{page[: -len(".md")]}/"', index, page)

    def test_strict_build_fails_on_a_page_left_out_or_a_broken_link(self) -> None:
        """
        A page missing from the nav, or a link to a page or anchor that
        does not exist, fails the strict build, naming it.
        """
        copy = Path(temp_dir(self))
        shutil.copytree(
            DOCS, copy / "docs", ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        (copy / "docs" / "orphan.md").write_text(
            "# Orphan\n\n[gone](nowhere.md), [no anchor](index.md#no-such-part)\n"
        )
        result = build(copy / "mkdocs.yml", copy / "site")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn('not included in the "nav"', result.stderr)
        self.assertIn("- orphan.md", result.stderr)
        self.assertIn("'nowhere.md'", result.stderr)
        self.assertIn("'#no-such-part'", result.stderr)
