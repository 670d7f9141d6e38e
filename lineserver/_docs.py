"""What the docs site generates from the code, so that it cannot drift.

The configuration reference is made from the tables Twisted's
C{usage.Options} builds for C{twistd lineserver --help}: every option, its
default, its help text.  The connection state machine is drawn from
L{lineserver.session.TRANSITIONS}.  Both are plain text here (Markdown,
Graphviz DOT); docs/hooks.py hands them to MkDocs, and renders the DOT
with Graphviz's C{dot}.  No MkDocs import: this module is also what the
tests check.
"""

from __future__ import annotations

import html
import re
import subprocess
from dataclasses import dataclass

from lineserver.session import TRANSITIONS, Event, Phase
from lineserver.tap import Options

#: A default written in an option's help text, as Twisted's C{--help}
#: shows it ("[default: off]") or as our help texts say it ("(default:
#: never)").
_DEFAULT_IN_HELP = re.compile(r"[\[(]default: ([^\])]+)[\])]")


@dataclass(frozen=True)
class OptionRow:
    """
    One option of C{twistd lineserver}, as C{--help} shows it.

    @ivar name: the long name, without dashes.
    @ivar short: the one-letter synonym, or None.
    @ivar takes_value: C{--name=VALUE} rather than a flag.
    @ivar default: what applies when the option is not given, or None if
        nothing is said (an action such as C{--version}).
    @ivar help: the help text.
    """

    name: str
    short: str | None
    takes_value: bool
    default: str | None
    help: str


def option_rows(options: type[Options] = Options) -> list[OptionRow]:
    """
    @return: every option of C{options}, sorted by name, from the tables
        Twisted's C{--help} is printed from.
    """
    parsed = options()
    shorts = {
        canonical: alias
        for alias, canonical in parsed.synonyms.items()
        if len(alias) == 1
    }
    rows = []
    for long_option in parsed.longOpt:
        takes_value = long_option.endswith("=")
        name = long_option.rstrip("=")
        text = " ".join(parsed.docs.get(name, "").split())
        default = parsed.defaults.get(name)
        if not takes_value and name in parsed.defaults:
            shown: str | None = "off"
        elif default is not None:
            shown = str(default)
        else:
            found = _DEFAULT_IN_HELP.search(text)
            shown = found.group(1) if found else None
        rows.append(OptionRow(name, shorts.get(name), takes_value, shown, text))
    return sorted(rows, key=lambda row: row.name)


def _cell(text: str) -> str:
    """
    Text as a Markdown table cell: literal, whatever it contains.
    """
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*_\[\]|])", r"\\\1", text)


def reference_markdown(options: type[Options] = Options) -> str:
    """
    @return: the configuration reference page: one row per option.
    """
    lines = [
        "# Configuration reference",
        "",
        "Every option of `twistd lineserver`, generated from the option table",
        "that `twistd lineserver --help` prints, when the site is built; so it",
        "is always the code's. [Configuration](configuration.md) explains the",
        "options by topic, with examples.",
        "",
        "| option | default | what it does |",
        "| --- | --- | --- |",
    ]
    for row in option_rows(options):
        name = f"--{row.name}=VALUE" if row.takes_value else f"--{row.name}"
        if row.short is not None:
            name += f"`, `-{row.short}"
        default = "(none)" if row.default is None else f"`{row.default}`"
        lines.append(f"| `{name}` | {default} | {_cell(row.help)} |")
    lines += [
        "",
        "Sizes take K, M, G suffixes; times are seconds. `--port`, `--allow`",
        "may be given more than once.",
        "",
    ]
    return "\n".join(lines)


# -- drawings ----------------------------------------------------------------


def state_machine_dot() -> str:
    """
    @return: the connection state machine, every move of
        L{TRANSITIONS}, as a Graphviz digraph.  C{close} and C{lost},
        legal from every phase, are drawn once, from "any phase".
    """
    edges = [
        f'    "{phase.value}" -> "{target.value}" [label="{event.value}"];'
        for (phase, event), target in TRANSITIONS.items()
        if event not in (Event.CLOSE, Event.LOST)
    ]
    lines = [
        "digraph session {",
        "    rankdir=TB;",
        '    node [shape=box, style=rounded, fontname="sans-serif"];',
        '    edge [fontname="sans-serif", fontsize=10];',
        *(f'    "{phase.value}";' for phase in Phase),
        '    "any phase" [shape=plaintext];',
        *edges,
        f'    "any phase" -> "{Phase.CLOSING.value}" '
        f'[label="{Event.CLOSE.value}", style=dashed];',
        f'    "any phase" -> "{Phase.CLOSED.value}" '
        f'[label="{Event.LOST.value}", style=dashed];',
        "}",
    ]
    return "\n".join(lines) + "\n"


#: The supervision tree, as docs/architecture.md describes it: a node per
#: child, with its module's class and its restart kind.
SUPERVISION_DOT = """\
digraph supervision {
    rankdir=TB;
    node [shape=box, style=rounded, fontname="sans-serif"];
    edge [fontname="sans-serif", fontsize=10];
    server [label="LineServer\\nSupervisor, one_for_one\\nlineserver.server"];
    sink [label="sink\\nSinkService, permanent\\nlineserver.sink_service"];
    listener [label="listener N <endpoint>\\nListenerService, permanent\\n\
lineserver.listener (one per --port)"];
    metrics [label="metrics <endpoint>\\nMetricsService, permanent\\n\
lineserver.metrics (--metrics)"];
    sighup [label="sighup\\nHangupReload, permanent\\n\
lineserver.signals (twistd; reload)"];
    sigusr1 [label="sigusr1\\nLogReopen, permanent\\n\
lineserver.signals (twistd; reopen logs)"];
    control [label="control <endpoint>\\nControlService, permanent\\n\
lineserver.control.service (--control)"];
    connections [label="connections\\nConnectionRegistry, temporary\\n\
lineserver.connections", style="rounded,dashed"];
    queue [label="SinkQueue\\nowned by LineServer,\\noutlives the sink",
           shape=note];
    server -> sink;
    server -> listener;
    server -> metrics;
    server -> sighup;
    server -> sigusr1;
    server -> control;
    server -> connections [style=dashed];
    listener -> connections [style=dotted, label="accepted"];
    connections -> queue [style=dotted, label="lines"];
    queue -> sink [style=dotted, label="batches"];
}
"""


def render_svg(dot_source: str) -> bytes:
    """
    Draw a Graphviz graph with C{dot} (the graphviz package).

    @raise RuntimeError: dot is missing or refuses the graph.
    """
    try:
        result = subprocess.run(
            ["dot", "-Tsvg"],
            input=dot_source.encode(),
            capture_output=True,
            timeout=60,
            check=False,
        )
    except FileNotFoundError as error:
        raise RuntimeError(
            "Graphviz's dot is missing: make system-tools installs it "
            "(apt-get install graphviz)"
        ) from error
    if result.returncode != 0:
        raise RuntimeError(f"dot failed: {result.stderr.decode(errors='replace')}")
    return result.stdout


#: The drawings, by the file name the site serves them under.
DRAWINGS = {
    "drawings/supervision-tree.svg": lambda: SUPERVISION_DOT,
    "drawings/connection-states.svg": state_machine_dot,
}
