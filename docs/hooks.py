"""MkDocs hooks (mkdocs.yml C{hooks:}): the pages and drawings generated
from the code when the site is built (lineserver/_docs.py).

- C{reference.md}: every twistd option, its default and help text.
- C{drawings/*.svg}: the supervision tree and the connection state
  machine, drawn with Graphviz's C{dot} (offline: the SVG is made at
  build time, the page needs no script).  They are shown on
  architecture.md, under the sections that describe them.
"""

from __future__ import annotations

from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

from lineserver._docs import DRAWINGS, reference_markdown, render_svg

#: Which drawing goes under which heading of which page.
FIGURES = {
    "architecture.md": [
        (
            "## Supervision tree",
            "drawings/supervision-tree.svg",
            "The supervision tree",
        ),
        (
            "## A connection's life",
            "drawings/connection-states.svg",
            "The connection state machine, drawn from session.TRANSITIONS",
        ),
    ],
}


def on_files(files: Files, config: Any) -> Files:
    files.append(File.generated(config, "reference.md", content=reference_markdown()))
    for name, source in DRAWINGS.items():
        try:
            svg = render_svg(source())
        except RuntimeError as error:
            raise PluginError(str(error)) from error
        files.append(File.generated(config, name, content=svg))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    lines = markdown.splitlines()
    for heading, drawing, caption in FIGURES.get(page.file.src_uri, []):
        at = next((i for i, line in enumerate(lines) if line.startswith(heading)), None)
        if at is None:
            raise PluginError(
                f"{page.file.src_uri} has no heading {heading!r} to put "
                f"{drawing} under (docs/hooks.py FIGURES)"
            )
        lines[at + 1 : at + 1] = ["", f"![{caption}]({drawing})", ""]
    return "\n".join(lines) + "\n"
