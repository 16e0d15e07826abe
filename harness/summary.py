"""The terminal summary, rendered from records (the same records the JSON and HTML are made from)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

from harness.contract import DEFAULT_DTYPES, DIRECTIONS
from harness.findings import Finding, render_findings
from harness.records import Record, format_ratio, printable, verdict, worst_status

__all__ = ["summary_table", "details", "checked_table", "terminal_text"]


def _ratio_text(r: Record) -> str:
    if r.ratio is None:
        return "-"
    return f"{format_ratio(r.ratio)}x tol" if r.ratio < 1e300 else "inf (NaN/Inf)"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join([line, sep, *body])


def summary_table(records: Sequence[Record], *, per_quantity: bool = False) -> str:
    """One row per implementation, dtype, oracle and direction (or per quantity, for certify).

    Rows where nothing was compared (every record a skip) are left out of the table and listed
    once per reason underneath, so that what was checked stays readable; the JSON and HTML keep
    every skip record.
    """
    def key(r: Record) -> tuple[str, ...]:
        return (r.implementation, r.dtype, r.oracle, r.direction) + ((r.quantity,) if per_quantity else ())

    rows = []
    skipped: dict[str, int] = {}
    for k, grouped in groupby(records, key=key):
        group = list(grouped)
        status = worst_status(group)
        if status == "skip":
            reason = group[0].reason or "skipped"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        scored = [r for r in group if r.ratio is not None]
        worst = max(scored, key=lambda r: r.ratio or 0.0) if scored else None
        note = ""
        if status in ("error", "contract"):
            note = next(r.reason for r in group if r.status == status).splitlines()[0][:90]
        elif status == "fail":
            bad = [r.quantity for r in group if r.status == "fail"]
            note = "not close: " + ", ".join(bad)
        elif worst is not None and worst.method == "projection":
            note = "random-direction projections"
        partial = sorted({r.reason for r in group if r.status == "skip" and r.reason})
        if partial and not note:
            note = "; ".join(partial)[:90]
        examples = str(max(r.examples for r in group))
        cells = [k[0], k[1], k[2], k[3]]
        if per_quantity:
            cells.append(k[4])
        worst_q = "" if per_quantity or worst is None else f" ({worst.quantity})"
        cells += [status.upper() if status != "pass" else "pass",
                  (_ratio_text(worst) + worst_q) if worst else "-", examples, note]
        rows.append(cells)
    headers = ["implementation", "dtype", "oracle", "direction"]
    if per_quantity:
        headers.append("quantity")
    headers += ["status", "worst error", "cases", "note"]
    parts = [_table(headers, rows)] if rows else ["(nothing was compared)"]
    if skipped:
        unit = "quantities" if per_quantity else "rows"
        parts.append("\nNot checked (skipped, with the reason):")
        parts += [f"  - {reason} ({n} {unit})" for reason, n in skipped.items()]
    return "\n".join(parts)


def details(records: Sequence[Record]) -> str:
    """The message of every record that did not pass, with its case and replay command."""
    out = []
    seen = set()
    for r in records:
        if r.ok:
            continue
        if r.status in ("error", "contract"):
            key = (r.implementation, r.dtype, r.oracle, r.direction, r.reason)
            if key in seen:
                continue
            seen.add(key)
        lines = [r.message]
        if r.case:
            lines.append(f"Minimal case: T={r.case.get('T')}, B={r.case.get('B')}, D={r.case.get('D')}, "
                         f"H={r.case.get('H')}, {r.case.get('dtype')}, seed={r.case.get('seed')}")
        if r.traceback:
            lines.append(r.traceback.rstrip())
        if r.replay:
            lines.append(f"Replay: {r.replay}")
        out.append("\n".join(lines))
    return "\n\n".join(out)


#: After a cell of the checked table: some of its cases passed only with the float32 tolerance widened.
WIDENED_MARK = "*"


def _cell(group: Sequence[Record]) -> str:
    status = worst_status(group)
    if status == "skip":
        return "-"
    ratios = [r.headline_ratio for r in group if r.headline_ratio is not None]
    word = "pass" if status == "pass" else status.upper()
    widened = WIDENED_MARK if any(r.widened_cases for r in group) else ""
    return f"{word} {format_ratio(max(ratios))}{widened}" if ratios and status in ("pass", "fail") else word


def checked_table(records: Sequence[Record]) -> str:
    """What was checked, compactly: one row per oracle (and implementation), one column per dtype and
    direction, each cell the status and the largest error relative to tolerance (as a multiple of it);
    ``-`` where nothing was compared. The skip reasons follow, each once."""
    columns = [(d, c) for d in DEFAULT_DTYPES for c in DIRECTIONS
               if any(r.dtype == d and r.direction == c for r in records)]
    impls = list(dict.fromkeys(r.implementation for r in records))
    named = len(impls) > 1
    rows = []
    skipped: dict[str, int] = {}
    for impl in impls:
        for oracle in dict.fromkeys(r.oracle for r in records if r.implementation == impl):
            mine = [r for r in records if r.implementation == impl and r.oracle == oracle]
            cells = []
            for dtype, direction in columns:
                group = [r for r in mine if r.dtype == dtype and r.direction == direction]
                cells.append(_cell(group) if group else "")
                if group and worst_status(group) == "skip":
                    reason = group[0].reason or "skipped"
                    skipped[reason] = skipped.get(reason, 0) + 1
            if all(c in ("-", "") for c in cells):
                continue
            cases = str(max(r.examples for r in mine))
            rows.append(([impl] if named else []) + [oracle, *cells, cases])
    headers = (["implementation"] if named else []) + ["oracle", *(f"{d} {c}" for d, c in columns), "cases"]
    parts = [_table(headers, rows) if rows else "(nothing was compared)"]
    parts.append("(each cell: status and largest error as a multiple of the tolerance; cases: distinct cases per "
                 "check, shrinking not counted)")
    if any(r.widened_cases for r in records):
        parts.append(f"({WIDENED_MARK}: some of its float32 cases passed only with the tolerance widened by the case's "
                     f"amplification of rounding; the note below says how many)")
    if skipped:
        parts.append("Not checked:")
        parts += [f"  - {reason} ({n} {'check' if n == 1 else 'checks'})" for reason, n in skipped.items()]
    return "\n".join(parts)


def terminal_text(records: Sequence[Record], found: Sequence[Finding], *, notes: Sequence[str] = (),
                  verbose: bool = False, diagnosis: str = "") -> str:
    """What ``certify``, ``run`` and ``replay`` print: the diagnosis (the convention search's one line, when
    it ran), the findings (one per root cause), then what was checked, then the verdict. ``verbose`` adds
    the table of every quantity and every record's message."""
    parts = [f"Diagnosis: {diagnosis}"] if diagnosis else []
    text = render_findings(found)
    if text:
        parts.append(text)
    parts.append(summary_table(records, per_quantity=True) if verbose else checked_table(records))
    if notes:
        parts.append("\n".join(f"note: {printable(line)}" for line in notes))
    if verbose:
        every = details(records)
        if every:
            parts.append("Every discrepancy and error:\n\n" + every)
    parts.append(f"Verdict: {verdict(records)}")
    return "\n\n".join(parts)
