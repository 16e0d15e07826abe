"""The HTML report: one self-contained page rendered from ``report.json`` (see :mod:`reports.json`).

The page is what a person keeps and attaches to a pull request, so it must open anywhere, offline:
CSS, script and figures are inline and the page holds no URL at all. Everything shown comes from the
report's records; nothing here compares arrays. Text from an implementation (its name, its exception
messages) is untrusted: the templates are Jinja2 with autoescaping on, always.

Layout, the answer first: a one-line header (verdict, target, counts); the convention search's
diagnosis; the findings (report.json's ``findings``, one per root cause: its largest error as a
multiple of the tolerance and where it is, the first timestep over tolerance, the evidence, the minimal
case with its link and replay command, the largest-error case's link), all within the first screen at
1366x768. Then the matrix (one row per implementation and oracle, one cell per direction and dtype, so
every oracle shows however many ran), one section per discrepancy (failing record, or one group of
error / contract records that share their message) with heatmaps of |error| / allowed, and last the
run's settings, environment, tolerances and oracles. Figures are drawn on the largest-error case when
the search kept its map (``worst_seen``), else on the minimal case, and say which; every figure of a page
shares one colour scale. Only the first ``max_plotted`` sections get figures, so a large run stays a
reasonable size.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.contract import DEFAULT_DTYPES, DIRECTIONS
from harness.files import write_atomically
from harness.records import Record, format_coords, format_direction_steps, format_pair, format_ratio, status_rank
from harness.structure import Structure

__all__ = ["render_html", "write_html", "MAX_SECTIONS", "MAX_PLOTTED"]

#: Discrepancy sections written in full; the rest are listed in one table.
MAX_SECTIONS = 200
#: Sections that get figures (the slow, large part of the page).
MAX_PLOTTED = 50

_TEMPLATES = Path(__file__).with_name("templates")
_VERDICT_TEXT = {
    "certified": "Certified: every check agrees within tolerance",
    "discrepancies": "Discrepancies found",
    "error": "Error: checks could not complete",
}


def _jinja_env():
    try:
        import jinja2
    except ImportError:
        raise ImportError(
            "the HTML report needs jinja2 and matplotlib: pip install 'lstm-harness[report]'",
            name="jinja2",
        ) from None
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
        autoescape=True,  # always, whatever the template's extension: names and messages are untrusted
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["times"] = times
    env.filters["num"] = _num
    env.filters["sci"] = _sci
    env.filters["breakable"] = _breakable
    return env


def _inline_assets() -> dict[str, Any]:
    """The page's CSS and script, and a Content-Security-Policy that allows exactly these two.

    The policy is defence in depth behind autoescaping: the page may run only its own script (by
    hash), apply only its own style sheet, show only ``data:`` images and load nothing else, so even
    markup that slipped through could neither run nor fetch.
    """
    from markupsafe import Markup

    css = (_TEMPLATES / "report.css").read_text(encoding="utf-8")
    js = (_TEMPLATES / "report.js").read_text(encoding="utf-8")

    def digest(text: str) -> str:
        b64 = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
        return f"'sha256-{b64}'"

    csp = (f"default-src 'none'; img-src data:; style-src {digest(css)}; script-src {digest(js)}; "
           "base-uri 'none'; form-action 'none'")
    return {"style": Markup(css), "script": Markup(js), "csp": csp}


def times(ratio: float | None) -> str:
    """A ratio |error| / allowed as a multiple of the tolerance, written by :func:`format_ratio`: ``0.0093×``,
    ``18000×``, ``2.4e+07×``; ``inf×`` for a NaN or Inf where the oracle is finite."""
    if ratio is None:
        return "–"
    return f"{format_ratio(ratio)}×"


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1e300:
        return "inf" if value > 0 else "-inf"
    return f"{value:.6g}"


def _sci(value: Any) -> str:
    """A tolerance: ``1.0e-09``, the way render_message writes it."""
    return f"{value:.1e}" if isinstance(value, (int, float)) and not isinstance(value, bool) else _num(value)


def _level(status: str, ratio: float | None) -> str:
    """The colour class of a matrix cell: status, graded by how close to (or far over) tolerance."""
    if status == "pass":
        if ratio is None or ratio < 0.1:
            return "pass-low"
        return "pass-mid" if ratio < 0.5 else "pass-high"
    if status == "fail":
        if ratio is None or ratio < 10:
            return "fail-low"
        return "fail-mid" if ratio < 1e3 else "fail-high"
    return status


@dataclass
class Cell:
    status: str = "none"
    ratio: float | None = None
    level: str = "none"
    title: str = ""
    failing: list[tuple[str, str]] = field(default_factory=list)  # (quantity, section id)
    anchor: str = ""
    count: int = 0
    reason: str = ""  # first line of the first non-passing record's reason (why skipped, ...)
    examples: int = 0  # distinct cases of this check (all its searches)
    widened: int = 0  # of those, how many passed only with the float32 tolerance widened (Record.widened_cases)


@dataclass
class Section:
    id: str
    status: str
    title: str
    record: Record
    quantities: list[str]
    oracles: list[str]
    case_rows: list[tuple[str, str]]
    spec_text: str
    worst_rows: list[tuple[str, str]]
    case_href: str | None
    message: str = ""
    heatmap: str | None = None
    heatmap_alt: str = ""
    panel_notes: list[str] = field(default_factory=list)
    timestep: str | None = None
    plot_note: str = ""
    plot_source: str = ""  # which case the figures are drawn on
    plot_href: str | None = None
    case_path: str = ""  # the saved case, relative to the report directory when it lies inside it
    worst_seen_rows: list[tuple[str, str]] = field(default_factory=list)
    worst_seen_href: str | None = None
    worst_seen_path: str = ""


def _check_report(report: Any) -> None:
    if not isinstance(report, Mapping):
        raise TypeError(f"report: expected a dict read from report.json, got {type(report).__name__}")
    missing = [k for k in ("records", "verdict") if k not in report]
    if missing:
        raise ValueError(f"report: expected the keys of report.json (schema_version 1); missing {missing}")
    version = report.get("schema_version")
    if version != 1:
        raise ValueError(f"report: expected schema_version 1, got {version!r}")
    if not isinstance(report["records"], list):
        raise ValueError(f"report['records']: expected a list, got {type(report['records']).__name__}")


def _ordered(seen: Sequence[str], preferred: Sequence[str]) -> list[str]:
    first = [p for p in preferred if p in seen]
    return first + [s for s in dict.fromkeys(seen) if s not in first]


def _case_rows(case: Mapping[str, Any]) -> tuple[list[tuple[str, str]], str]:
    rows = [(k, _num(case.get(k))) for k in ("T", "B", "D", "H") if k in case]
    for k in ("dtype", "seed"):
        if k in case:
            rows.append((k, _num(case[k])))
    if case.get("structure"):
        rows.append(("structure", Structure.from_dict(case["structure"]).describe()))
    if case.get("lengths") is not None:
        rows.append(("lengths", ", ".join(str(n) for n in case["lengths"])))
    spec = case.get("spec") or {}
    spec_text = json.dumps(spec, sort_keys=False) if spec else ""
    return rows, spec_text


def _worst_rows(r: Record) -> list[tuple[str, str]]:
    w = r.worst or {}
    coords = w.get("coords") or {}
    rows: list[tuple[str, str]] = []
    if coords:
        rows.append(("at", ", ".join(f"{k}={v}" for k, v in coords.items())))
    if w.get("actual") is not None or w.get("expected") is not None:
        actual, expected = format_pair(w.get("actual"), w.get("expected"))
        rows += [("actual", actual), ("expected", expected)]
    elif r.nonfinite:
        rows.append(("actual", "NaN or Inf"))
    for key, label in (("abs_error", "|error|"), ("allowed", "allowed")):
        if w.get(key) is not None:
            rows.append((label, _num(w[key])))
    if r.ratio is not None:
        rows.append(("|error| / allowed", times(r.ratio)))
    if r.total:
        pct = 100.0 * r.mismatched / r.total
        rows.append(("mismatched", f"{r.mismatched} / {r.total} ({pct:.1f}%)"))
    if r.nonfinite:
        rows.append(("non-finite", str(r.nonfinite)))
    if r.first_bad_t is not None:
        rows.append(("first timestep over tolerance", f"t={r.first_bad_t}"))
    if r.last_bad_t is not None and r.last_bad_t != r.first_bad_t:
        rows.append(("last timestep over tolerance", f"t={r.last_bad_t}"))
    if r.first_bad_by_direction:
        rows.append(("first step over tolerance by direction", format_direction_steps(r.first_bad_by_direction)))
    if r.rtol is not None:
        scale = f" × {r.atol_scale:.3g}" if r.atol_scale not in (None, 1.0) else ""
        rows.append(("tolerance", f"{r.tolerance_dtype}: rtol={r.rtol:.1e}, atol={r.atol:.1e}{scale}"))
    rows.append(("compared", "random-direction projections (finite differences)"
                 if r.method == "projection" else "elementwise"))
    return rows


def _case_href(case_file: str, base_dir: Path | None) -> str | None:
    """A link to the saved case: relative when it lies inside the report directory, else file URI."""
    if not case_file:
        return None
    p = Path(case_file)
    primary = (p if p.is_absolute() else Path.cwd() / p).resolve()
    if base_dir is not None:
        base = base_dir.resolve()
        if primary.is_relative_to(base):
            return _relative(primary, base)
        # A report re-rendered from elsewhere: the case may still sit in the report's own directory.
        for c in (base / p, base / "cases" / p.name):
            c = c.resolve()
            if c.is_relative_to(base) and c.exists():
                return _relative(c, base)
    return primary.as_uri()


def _shown_path(case_file: str, base_dir: Path | None) -> str:
    """The saved case as a person reads it: relative to the report directory when it lies inside it."""
    href = _case_href(case_file, base_dir)
    if not href or href.startswith("file:"):
        return case_file
    return urllib.parse.unquote(href)


def _seen_rows(seen: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The largest error the search saw for a quantity, on the case that showed it."""
    w = seen.get("worst") or {}
    rows = [("|error| / allowed", times(seen.get("ratio"))), ("case", _case_words(seen.get("case") or {}))]
    if w.get("coords"):
        rows.insert(1, ("at", format_coords(w["coords"])))
    if w.get("actual") is not None or w.get("expected") is not None:
        actual, expected = format_pair(w.get("actual"), w.get("expected"))
        rows += [("actual", actual), ("expected", expected)]
    if seen.get("first_bad_t") is not None:
        rows.append(("first timestep over tolerance", f"t={seen['first_bad_t']}"))
    return rows


def _relative(path: Path, base: Path) -> str:
    return urllib.parse.quote(path.relative_to(base).as_posix())


def _case_words(case: Mapping[str, Any]) -> str:
    """``T=3, B=2, D=5, H=4, unit weights``: which case a figure or a link is about."""
    parts = [f"{k}={case[k]}" for k in ("T", "B", "D", "H") if k in case]
    if case.get("structure"):
        parts.append(Structure.from_dict(case["structure"]).describe())
    scale = (case.get("spec") or {}).get("weight_scale")
    if scale:
        parts.append(f"{scale} weights")
    return ", ".join(parts)


def _figure_source(r: Record, base_dir: Path | None) -> tuple[Mapping[str, Any] | None, str, str | None]:
    """The error map to draw, the sentence that says which case it is, and a link to that case.

    The largest-error case when the search kept its map (``worst_seen``); else the minimal case, saying so.
    """
    seen = r.worst_seen or {}
    if seen.get("error_map"):
        return (seen["error_map"],
                f"Drawn on the largest-error case ({_case_words(seen.get('case') or {})}; "
                f"{times(seen.get('ratio'))} tolerance at worst).",
                _case_href(seen.get("case_file", ""), base_dir))
    where = f"Drawn on the minimal failing case ({_case_words(r.case or {})})"
    if seen:
        where += (f"; the largest-error case ({_case_words(seen.get('case') or {})}, "
                  f"{times(seen.get('ratio'))}) has no error map in report.json")
    return r.error_map, where + ".", _case_href(r.case_file, base_dir)


def _trivial(panels: Sequence[Any]) -> bool:
    """A map of one element per panel: a figure would be one rectangle; the worst element says it all."""
    return all(len(p.values) * len(p.values[0]) <= 1 for p in panels)


def _figures(section: Section, r: Record, plot_error: str | None, scale: tuple[float, float],
             base_dir: Path | None) -> None:
    from reports import plots

    source, section.plot_source, section.plot_href = _figure_source(r, base_dir)
    if source is None:
        section.plot_source = ""
        if r.method == "projection":
            section.plot_note = ("Compared along random directions (finite differences), so there is no "
                                 "per-element map; the worst direction is shown above.")
        return
    panels = plots.panels_of(source)
    section.panel_notes = [
        f"{p.title if p.title != 'all' else r.quantity}: {p.over} of {len(p.values) * len(p.values[0])} "
        f"cells over tolerance, worst {times(p.worst)}"
        for p in panels
    ]
    pooled = [p for p in panels if p.x_step > 1 or p.y_step > 1]
    if pooled:
        section.panel_notes.append("Large axes are max-pooled: one cell shows the worst of a block")
    if plot_error:
        section.plot_note = f"No figures: {plot_error}."
        return
    if _trivial(panels):
        section.plot_note = "No figure: that case has one element per panel; its worst element is above."
        return
    section.heatmap = plots.heatmap_png(panels, quantity=r.quantity, scale=scale)
    section.heatmap_alt = f"Heatmap of |error| / allowed for {r.quantity}: " + "; ".join(section.panel_notes)
    section.timestep = plots.timestep_png(panels, direction=r.direction, first_bad_t=r.first_bad_t,
                                          quantity=r.quantity, scale=scale)


def _map_of(r: Record) -> Mapping[str, Any] | None:
    return (r.worst_seen or {}).get("error_map") or r.error_map


def _build(report: Mapping[str, Any], base_dir: Path | None, max_sections: int, max_plotted: int):
    from reports import plots

    records = [Record.from_dict(d) for d in report["records"]]
    # Rows and columns: declared order first, then whatever the records add.
    impl_names = _ordered([r.implementation for r in records],
                          [i.get("name", "") for i in report.get("implementations", [])])
    oracle_names = _ordered([r.oracle for r in records],
                            [o.get("name", "") for o in report.get("oracles", [])])
    dtypes = _ordered([r.dtype for r in records], DEFAULT_DTYPES)

    # Discrepancy sections: each failing record; and each group of error / contract records that share
    # implementation, dtype, direction and message (the implementation raised once, whatever the
    # oracle, so one section names every oracle and quantity it stopped).
    sections: list[Section] = []
    by_record: dict[int, str] = {}
    groups: dict[tuple, Section] = {}
    rank_impl = {n: i for i, n in enumerate(impl_names)}
    bad = sorted((r for r in records if r.status in ("fail", "error", "contract")),
                 key=lambda r: rank_impl.get(r.implementation, 99))
    plot_error = plots.available()
    for r in bad:
        key = (r.implementation, r.dtype, r.direction, r.status, r.reason)
        if r.status in ("error", "contract") and key in groups:
            sec = groups[key]
            for name, values in ((r.quantity, sec.quantities), (r.oracle, sec.oracles)):
                if name not in values:
                    values.append(name)
            by_record[id(r)] = sec.id
            continue
        case_rows, spec_text = _case_rows(r.case or {})
        sec = Section(
            id=f"d{len(sections) + 1}",
            status=r.status,
            title="",
            record=r,
            quantities=[r.quantity],
            oracles=[r.oracle],
            case_rows=case_rows,
            spec_text=spec_text,
            worst_rows=_worst_rows(r) if r.status == "fail" else [],
            case_href=_case_href(r.case_file, base_dir),
            case_path=_shown_path(r.case_file, base_dir),
        )
        if r.worst_seen:
            sec.worst_seen_rows = _seen_rows(r.worst_seen)
            sec.worst_seen_href = _case_href(r.worst_seen.get("case_file", ""), base_dir)
            sec.worst_seen_path = _shown_path(r.worst_seen.get("case_file", ""), base_dir)
        if r.status in ("error", "contract"):
            groups[key] = sec
        by_record[id(r)] = sec.id
        sections.append(sec)
    for sec in sections:
        r = sec.record
        what = {"fail": "not close", "error": "raised an error", "contract": "broke the contract"}[r.status]
        oracles = ", ".join(sec.oracles)
        sec.title = (f"{r.label}: {what}" if r.status == "fail" else
                     f"{r.implementation} ({r.dtype}) vs {oracles}, {r.direction}: {what}")
        # A group's message names all its quantities and oracles (rendered from a record that says so).
        grouped = len(sec.quantities) > 1 or len(sec.oracles) > 1
        sec.message = (dataclasses.replace(r, quantity=", ".join(sec.quantities), oracle=oracles) if grouped
                       else r).message
    # Figures: the first max_plotted failures that have a map, all on ONE colour scale, so that the same
    # colour means the same multiple of the tolerance in every heatmap of the page.
    to_plot = [sec for sec in sections[:max_sections] if sec.status == "fail"]
    mapped = [sec for sec in to_plot if _map_of(sec.record) is not None]
    scale = plots.report_scale([p for sec in mapped[:max_plotted] for p in plots.panels_of(_map_of(sec.record))])
    left_out = {id(sec) for sec in mapped[max_plotted:]}
    for sec in to_plot:
        if id(sec) in left_out:
            sec.plot_note = f"Figures left out: only the first {max_plotted} discrepancies are plotted."
        else:
            _figures(sec, sec.record, plot_error, scale, base_dir)
    not_plotted = max(0, len(mapped) - max_plotted)

    # The matrix: one row per implementation and oracle, one column per direction and dtype, so that it
    # stays a few columns wide however many oracles ran (every oracle is a row, never clipped).
    columns = [(d, t) for d in DIRECTIONS for t in dtypes
               if any(r.direction == d and r.dtype == t for r in records)]
    matrix: list[tuple[str, list[tuple[str, list[Cell]]]]] = []
    for impl in impl_names:
        rows = []
        for o in oracle_names:
            mine = [r for r in records if r.implementation == impl and r.oracle == o]
            if not mine:
                continue
            rows.append((o, [_cell([r for r in mine if r.direction == d and r.dtype == t], by_record)
                             for d, t in columns]))
        matrix.append((impl, rows))

    skipped: dict[str, list[str]] = {}
    for r in records:
        if r.status == "skip":
            where = f"{r.implementation} vs {r.oracle}, {r.direction}, {r.dtype}"
            lst = skipped.setdefault(r.reason or "no reason given", [])
            if where not in lst:
                lst.append(where)

    return {
        "records": records,
        "impl_names": impl_names,
        "columns": columns,
        "direction_spans": _spans([c[0] for c in columns]),
        "oracle_names": oracle_names,
        "scale": scale,
        "matrix": matrix,
        "sections": sections[:max_sections],
        "overflow": sections[max_sections:],
        "n_sections": len(sections),
        "not_plotted": not_plotted,
        "max_plotted": max_plotted,
        "skipped": skipped,
        "plot_error": plot_error,
    }


def _cell(group: Sequence[Record], by_record: Mapping[int, str]) -> Cell:
    """One matrix cell: the worst status of ``group`` (the quantities of one check) and its worst error."""
    cell = Cell(count=len(group))
    if not group:
        return cell
    cell.examples = max(r.examples for r in group)
    cell.status = min((r.status for r in group), key=status_rank)
    scored = [r.headline_ratio for r in group if r.headline_ratio is not None]  # the largest error seen
    cell.ratio = max(scored) if scored else None
    cell.level = _level(cell.status, cell.ratio)
    lines = []
    for r in group:
        line = f"{r.quantity}: {r.status}"
        if r.headline_ratio is not None:
            line += f", {times(r.headline_ratio)} tol"
        if r.status != "pass" and r.reason:
            line += f" ({r.reason.splitlines()[0][:160]})"
        lines.append(line)
    cell.widened = max(r.widened_cases for r in group)
    if cell.widened:
        lines.append(f"{cell.widened} of {cell.examples} cases passed only with the float32 tolerance widened by "
                     f"the case's amplification of rounding (a correct float32 LSTM errs past the table's there)")
    cell.title = "\n".join(lines)
    cell.reason = next((r.reason.splitlines()[0] for r in group if r.reason and r.status != "pass"), "")
    seen_sid: list[str] = []
    for r in group:
        sid = by_record.get(id(r))
        if sid and sid not in seen_sid:
            seen_sid.append(sid)
            cell.failing.append((r.quantity if r.status == "fail" else "details", sid))
    cell.anchor = seen_sid[0] if seen_sid else ""
    return cell


def _spans(keys: Sequence[Any]) -> list[tuple[Any, int]]:
    out: list[tuple[Any, int]] = []
    for k in keys:
        if out and out[-1][0] == k:
            out[-1] = (k, out[-1][1] + 1)
        else:
            out.append((k, 1))
    return out


def _environment_rows(env: Mapping[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """Python, the installed distributions under their real names, platform, CPU, GPU; and the frameworks
    that no installed distribution provides (``tensorflow`` is not missing when ``tensorflow-cpu`` is there)."""
    rows = []
    if env.get("python"):
        rows.append(("Python", f"{env.get('implementation', '')} {env['python']}".strip()))
    packages = env.get("packages") or {}
    installed = {name: version for name, version in packages.items() if version}
    provides = env.get("provides") or {}
    for name, version in installed.items():
        imports = [m for m, dists in provides.items() if name in dists and m != name.replace("-", "_").lower()]
        rows.append((name, f"{version} (provides import {', '.join(imports)})" if imports else str(version)))
    rows.append(("Platform", str(env.get("platform") or "–")))
    rows.append(("CPU", str(env.get("cpu") or "–")))
    rows.append(("GPU", str(env.get("gpu") or "none detected")))
    if "missing" in env:
        missing = [str(m) for m in env.get("missing") or []]
    else:  # written before "missing" was: a name is missing only when no installed variant of it is listed
        missing = [n for n, v in packages.items()
                   if not v and not any(other.lower().replace("_", "-").startswith(n.lower() + "-")
                                        for other in installed)]
    return rows, missing


def _target_rows(info: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """What ``certify``'s TARGET resolved to (``target_info`` in report.json), as label / text rows."""
    if not info:
        return []
    rows = []
    if info.get("name"):
        rows.append(("name", str(info["name"])))
    if info.get("variant"):
        rows.append(("variant", str(info["variant"])))
    if info.get("dtypes"):
        rows.append(("dtypes", ", ".join(str(d) for d in info["dtypes"])))
    if "backward" in info:
        rows.append(("backward", "yes" if info["backward"] else "no (forward only)"))
    loaded = info.get("loaded") or {}
    if loaded:
        where = " ".join(str(loaded[k]) for k in ("kind", "location") if loaded.get(k))
        attr = f", attribute {loaded['attribute']}" if loaded.get("attribute") else ""
        rows.append(("loaded from", f"{where}{attr}" or str(loaded.get("text", ""))))
    elif info.get("target"):
        rows.append(("target", str(info["target"])))
    if "isolated" in info:
        rows.append(("isolated", "yes (worker process)" if info["isolated"] else "no (in process)"))
    return rows


def _settings_rows(given: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The run's settings as it used them: cases per search with where the number comes from, whether the
    search is derandomized, the seed policy (from :func:`reports.json.settled` for a report written before
    report.json recorded them)."""
    from reports.json import settled

    settings = settled(dict(given))
    profile = settings.get("profile")
    rows: list[tuple[str, str]] = []
    if profile is not None:
        rows.append(("Hypothesis profile", str(profile)))
    if settings.get("examples_per_search") is not None:
        origin = ("set by --max-examples" if settings.get("max_examples") is not None
                  else f"the {profile} profile's max_examples")
        rows.append(("cases per search", f"{settings['examples_per_search']} ({origin})"))
    if "derandomize" in settings:
        rows.append(("derandomize", "yes" if settings["derandomize"] else "no"))
    if settings.get("seed_policy"):
        rows.append(("seed", str(settings["seed_policy"])))
    elif "seed" in settings:
        rows.append(("seed", "–" if settings["seed"] is None else str(settings["seed"])))
    shown = {"profile", "max_examples", "examples_per_search", "derandomize", "seed_policy", "seed"}
    for key, value in settings.items():
        if key in shown:
            continue
        if key == "memory_limit" and isinstance(value, int):
            text = f"{value / 2**30:.3g} GiB"
        elif key == "memory_limit" and value is None:
            text = "none"
        elif key == "timeout" and isinstance(value, (int, float)):
            text = f"{value:g} s"
        elif key == "timeout" and value is None:
            text = "none"
        elif key == "variant" and value is None:
            text = "as declared"
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(value, (list, tuple)):
            text = ", ".join(str(v) for v in value) or "–"
        else:
            text = "–" if value is None else str(value)
        rows.append((key.replace("_", " "), text))
    return rows


def _settings_per_search(settings: Mapping[str, Any]) -> Any:
    from reports.json import settled

    return settled(dict(settings)).get("examples_per_search") or "the profile's max_examples"


def _finding_views(report: Mapping[str, Any], sections: Sequence[Section],
                   base_dir: Path | None) -> list[dict[str, Any]]:
    """report.json's findings, as the page shows them: each with its largest error and where it is, the
    minimal case (a link, its path relative to the report, the replay command), the largest-error case,
    and the section below that holds the worst record."""
    out = []
    for k, f in enumerate(report.get("findings") or [], 1):
        if not isinstance(f, Mapping):
            continue
        w = f.get("worst") or {}
        view: dict[str, Any] = {
            "id": f"f{k}", "kind": str(f.get("kind", "")), "title": str(f.get("title", "")),
            "implementation": str(f.get("implementation", "")), "evidence": str(f.get("evidence", "")),
            "notes": [str(n) for n in f.get("notes") or []], "reason": str(f.get("reason", "")),
            "first_bad_t": f.get("first_bad_t"), "records": f.get("records"),
            "disagreeing": list(f.get("disagreeing") or []), "agreeing": list(f.get("agreeing") or []),
            "ratio": None, "where": "", "values": "", "case": _case_words(f.get("case") or {}),
            "case_rows": _case_rows(f.get("case") or {})[0],
            "case_href": _case_href(str(f.get("case_file", "")), base_dir),
            "case_path": _shown_path(str(f.get("case_file", "")), base_dir), "replay": str(f.get("replay", "")),
            "case_T": (f.get("case") or {}).get("T"), "largest_T": None,
            "largest_case": "", "largest_first_bad_t": w.get("first_bad_t"), "largest_href": None,
            "largest_path": "", "largest_replay": "", "section": "",
        }
        if w.get("ratio") is not None:
            view["ratio"] = w["ratio"]
            coords = format_coords(w.get("coords") or {})
            view["where"] = (f"{w.get('quantity', '')}{' at ' + coords if coords else ''} "
                             f"({w.get('direction', '')}, {w.get('dtype', '')}, vs {w.get('oracle', '')})")
            if w.get("actual") is not None or w.get("expected") is not None:
                actual, expected = format_pair(w.get("actual"), w.get("expected"))
                view["values"] = f"actual {actual}, expected {expected}"
            if w.get("case_file") and w.get("case_file") != f.get("case_file"):
                view["largest_case"] = _case_words(w.get("case") or {})
                view["largest_T"] = (w.get("case") or {}).get("T")
                view["largest_href"] = _case_href(str(w["case_file"]), base_dir)
                view["largest_path"] = _shown_path(str(w["case_file"]), base_dir)
                view["largest_replay"] = str(w.get("replay", ""))
        view["section"] = next(
            (sec.id for sec in sections
             if sec.record.implementation == view["implementation"]
             and (not w or (sec.record.quantity == w.get("quantity") and sec.record.dtype == w.get("dtype")
                            and sec.record.oracle == w.get("oracle") and sec.record.direction == w.get("direction")))
             and (w or sec.status == view["kind"])), "")
        out.append(view)
    return out


def _breakable(text: Any) -> Any:
    """Escaped ``text`` that may wrap after ``/ : . , _`` and before a capital that follows a lower-case
    letter, so that a long name wraps between its parts, never inside a word."""
    from markupsafe import Markup, escape

    out = []
    prev = ""
    for ch in str(text):
        if ch.isupper() and prev.islower():
            out.append(Markup("<wbr>"))
        out.append(escape(ch))
        if ch in "/:.,_":
            out.append(Markup("<wbr>"))
        prev = ch
    return Markup("").join(out)


def render_html(report: Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None,
                max_sections: int = MAX_SECTIONS, max_plotted: int = MAX_PLOTTED) -> str:
    """The report page as a string.

    ``base_dir`` is the directory the page will be written to; saved case files inside it are linked
    relatively, so the report directory can be moved or zipped as a whole.
    """
    _check_report(report)
    for name, value in (("max_sections", max_sections), ("max_plotted", max_plotted)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    base = Path(base_dir) if base_dir is not None else None
    data = _build(report, base, max_sections, max_plotted)
    env_rows, env_missing = _environment_rows(report.get("environment") or {})
    counts = report.get("counts") or {}
    verdict = str(report.get("verdict", "error"))
    tool = report.get("tool") or {}
    context = {
        "report": report,
        "verdict": verdict,
        "verdict_text": _VERDICT_TEXT.get(verdict, verdict),
        "tool": tool,
        "counts": [(s, counts.get(s, 0)) for s in ("pass", "fail", "error", "contract", "skip")],
        "env_rows": env_rows,
        "env_missing": env_missing,
        "settings_rows": _settings_rows(report.get("settings") or {}),
        "tolerances": [
            (dtype, kind, t.get("rtol"), t.get("atol"), t.get("reason", ""))
            for dtype, table in (report.get("tolerances") or {}).items()
            for kind, t in table.items()
        ],
        "oracles": report.get("oracles") or [],
        "notes": [str(n) for n in report.get("notes") or []],
        "target_rows": _target_rows(report.get("target_info")),
        "implementations": report.get("implementations") or [],
        "findings": _finding_views(report, data["sections"], base),
        "per_search": _settings_per_search(report.get("settings") or {}),
        "diagnosis": report.get("diagnosis") if isinstance(report.get("diagnosis"), Mapping) else None,
        **data,
        **_inline_assets(),
    }
    template = _jinja_env().get_template("report.html")
    return template.render(**context)


def write_html(report: Mapping[str, Any], path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Render ``report`` to ``path`` (directories created).

    Saved case files inside the page's directory are linked relatively. Returns ``path``.
    """
    path = Path(path)
    if path.exists() and path.is_dir():
        raise IsADirectoryError(f"path: expected a file name such as {path / 'index.html'}, got a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_html(report, base_dir=path.parent, **kwargs)
    return write_atomically(path, text)
