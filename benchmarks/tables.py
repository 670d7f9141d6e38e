"""The figures both harnesses print: paired ratios and the text tables.

Both result tables of C{benchmarks.run} set lineserver beside the baseline: one
row a scenario, the scenario left-aligned, every other cell right-aligned,
"-" where a figure is missing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from benchmarks.procs import BASELINE, LINESERVER


def paired_ratios(
    rates: Iterable[tuple[int, str, float]],
    over: str = BASELINE,
    server: str = LINESERVER,
) -> list[float]:
    """
    lineserver over baseline for each round: the two ran seconds apart,
    so each ratio saw about the same machine.

    @param rates: one scenario's C{(round, server, rate)} for every round.
    @param over: the server in the denominator.
    @param server: the server in the numerator.
    @return: the ratios in round order, for the rounds that measured both.
    """
    by_round: dict[int, dict[str, float]] = {}
    for round_number, label, rate in rates:
        by_round.setdefault(round_number, {})[label] = rate
    return [
        pair[server] / pair[over]
        for _, pair in sorted(by_round.items())
        if server in pair and over in pair
    ]


def cell(value: float | None, spec: str, scale: float = 1, suffix: str = "") -> str:
    """
    C{value / scale} formatted with C{spec}, then C{suffix}; or "-" if
    there is no value.
    """
    return "-" if value is None else format(value / scale, spec) + suffix


def spread(paired: Sequence[float]) -> str:
    """
    The lowest and highest paired ratio, as C{1.7-2.1}.
    """
    return f"{min(paired):.1f}-{max(paired):.1f}" if paired else "-"


def format_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    """
    @return: the lines of a table, with a rule under the header.
    """
    table = [tuple(header), *(tuple(row) for row in body)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [
        " | ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in table
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return lines
