"""The report's figures: heatmaps of |error| / allowed and error against timestep, as PNG data URIs.

Figures are drawn by matplotlib (the object-oriented API on the Agg canvas, so that rendering a
report never touches pyplot's global state or a display) and embedded as ``data:image/png;base64``
URIs. PNG rather than inline SVG because matplotlib's SVG carries XML namespace URLs, and the page
must contain no URL at all.

Everything drawn comes from a record's ``error_map`` (see :func:`harness.compare.error_map`):
panels of |error| / allowed, already max-pooled to at most 48 x 48 cells. Colours are on a log scale
centred on 1, the tolerance: blue-grey below (how much room was left), yellow to dark red above (how
far over). matplotlib is imported inside the functions: the harness imports without it.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Panel", "panels_of", "report_scale", "heatmap_png", "timestep_profile", "timestep_png", "available"]

#: Smallest ratio the colour scale shows; exact agreement (ratio 0) is drawn in the same colour.
_FLOOR = 1e-3
#: error_map writes NaN / Inf differences as this ratio.
NONFINITE = 1e9


def available() -> str | None:
    """None when matplotlib can draw, else the reason it cannot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed (pip install 'lstm-harness[report]')"
    return None


@dataclass(frozen=True)
class Panel:
    """One panel of an error map, oriented for display.

    ``values[r][c]`` is drawn at row r (``y_axis``) and column c (``x_axis``); a time axis, if any,
    is put on x so that "wrong from t=3 on" reads left to right. ``x_size`` / ``y_size`` are the
    sizes before max-pooling, ``x_step`` / ``y_step`` how many original indices one cell covers.
    """

    title: str
    x_axis: str
    y_axis: str
    values: tuple[tuple[float, ...], ...]
    x_size: int
    y_size: int
    x_step: int
    y_step: int

    @property
    def over(self) -> int:
        """Cells (after pooling) over tolerance."""
        return sum(1 for row in self.values for v in row if v > 1.0)

    @property
    def worst(self) -> float:
        return max((v for row in self.values for v in row), default=0.0)


def _step(size: int, cells: int) -> int:
    return max(1, math.ceil(size / max(cells, 1)))


def panels_of(error_map: Mapping[str, Any] | None) -> list[Panel]:
    """The panels of a record's ``error_map``, validated and oriented for display."""
    if not error_map:
        return []
    raw = error_map.get("panels")
    if not isinstance(raw, Sequence):
        raise ValueError(f"error_map: expected a dict with a list 'panels', got {type(raw).__name__}")
    out = []
    for k, p in enumerate(raw):
        try:
            values = [[float(v) if v is not None else NONFINITE for v in row] for row in p["values"]]
            rows, cols = str(p.get("rows", "")), str(p.get("cols", ""))
            n_rows, n_cols = (int(s) for s in p.get("shape", (len(values), len(values[0]))))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(
                f"error_map['panels'][{k}]: expected {{title, rows, cols, shape, values (2-D list)}}, "
                f"got {p!r:.200} ({exc})"
            ) from None
        if not values or any(len(row) != len(values[0]) for row in values):
            raise ValueError(f"error_map['panels'][{k}]['values']: expected a non-empty rectangular 2-D list")
        if rows == "t":  # put time on the horizontal axis
            values = [list(col) for col in zip(*values, strict=True)]
            rows, cols, n_rows, n_cols = cols, rows, n_cols, n_rows
        out.append(Panel(
            title=str(p.get("title", "")),
            x_axis=cols,
            y_axis=rows,
            values=tuple(tuple(row) for row in values),
            x_size=n_cols,
            y_size=n_rows,
            x_step=_step(n_cols, len(values[0])),
            y_step=_step(n_rows, len(values)),
        ))
    return out


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _colormap(vmin_log: float, vmax_log: float):
    """Blue-grey for log10(ratio) below 0 (within tolerance), yellow to dark red above."""
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap, ListedColormap

    below = LinearSegmentedColormap.from_list("within", ["#f4f6f8", "#9fb3c8"])
    above = LinearSegmentedColormap.from_list("over", ["#fdd835", "#f57c00", "#c62828", "#4a0000"])
    n_below = max(2, round(256 * (0 - vmin_log) / (vmax_log - vmin_log)))
    n_above = max(2, 256 - n_below)
    colors = np.vstack([below(np.linspace(0, 1, n_below)), above(np.linspace(0, 1, n_above))])
    return ListedColormap(colors)


def report_scale(panels: Sequence[Panel]) -> tuple[float, float]:
    """The colour scale (log10 of the lowest and highest ratio drawn) for every figure of one report.

    One scale for the whole page: the same colour is the same multiple of the tolerance in every
    heatmap, and the per-timestep plots share the same vertical range.
    """
    worst = max((p.worst for p in panels), default=1.0)
    top = math.log10(min(max(worst, 10.0), NONFINITE))
    return math.log10(_FLOOR), math.ceil(top)


def heatmap_png(panels: Sequence[Panel], *, quantity: str = "", scale: tuple[float, float] | None = None) -> str:
    """One figure, one panel per gate (or a single panel), on ``scale`` (:func:`report_scale`, by default
    of these panels alone); a data URI."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    if not panels:
        raise ValueError("panels: expected at least one panel, got none")
    vmin, vmax = scale if scale is not None else report_scale(panels)
    cmap = _colormap(vmin, vmax)
    strip = all(len(p.values) == 1 for p in panels)
    n = len(panels)
    aspect_w = max(len(p.values[0]) for p in panels)
    aspect_h = max(len(p.values) for p in panels)
    panel_w = 2.6 if n > 1 else min(7.5, max(3.2, 0.22 * aspect_w + 1.2))
    panel_h = 0.9 if strip else min(3.4 if n == 1 else 2.3, max(1.6, panel_w * aspect_h / max(aspect_w, 1)))
    # Margins in inches, laid out by hand: matplotlib's constrained layout is most of the drawing
    # time, and a report may hold a hundred of these figures.
    left, right, gap, bottom, top = (0.2 if strip else 0.5), 1.3, 0.35, 0.42, 0.3
    width, height = left + n * panel_w + (n - 1) * gap + right, panel_h + bottom + top
    fig = Figure(figsize=(width, height), dpi=110)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=gap / panel_w)
    axes = fig.subplots(1, n, squeeze=False)[0]
    image = None
    for ax, p in zip(axes, panels, strict=True):
        data = np.log10(np.clip(np.asarray(p.values, dtype=float), 10**vmin, NONFINITE))
        extent = (-0.5, len(p.values[0]) * p.x_step - 0.5, len(p.values) * p.y_step - 0.5, -0.5)
        image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest",
                          extent=extent)
        ax.set_xlim(-0.5, p.x_size - 0.5)
        ax.set_ylim(p.y_size - 0.5, -0.5)
        over = p.over
        label = p.title if p.title and p.title != "all" else quantity
        title = f"{label}: {over} cell{'s' if over != 1 else ''} over" if over else f"{label}: ok"
        ax.set_title(title, fontsize=9, color="#b71c1c" if over else "#37474f",
                     fontweight="bold" if over else "normal")
        ax.set_xlabel(p.x_axis, fontsize=8)
        _index_ticks(ax.xaxis, p.x_size, 8)
        if strip:
            ax.set_yticks([])
        else:
            ax.set_ylabel(p.y_axis, fontsize=8)
            _index_ticks(ax.yaxis, p.y_size, 6)
        ax.tick_params(labelsize=7, length=2)
        for side in ax.spines.values():
            side.set_color("#90a4ae")
    cax = fig.add_axes((1 - (right - 0.15) / width, bottom / height, 0.13 / width, panel_h / height))
    assert image is not None, "at least one panel is drawn"
    bar = fig.colorbar(image, cax=cax)
    bar.set_label("|error| / allowed", fontsize=8)
    bar.set_ticks(_ticks(vmin, vmax, nonfinite=any(p.worst >= NONFINITE for p in panels)))
    bar.ax.yaxis.set_major_formatter(FuncFormatter(_power_label))
    bar.ax.axhline(0.0, color="#263238", linewidth=1.2)
    bar.ax.tick_params(labelsize=7, length=2)
    return _png(fig)


def _index_ticks(axis: Any, size: int, most: int) -> None:
    """Integer index ticks; every index when there are few (a locator would invent fractions)."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    if size <= most:
        axis.set_major_locator(FixedLocator(range(size)))
    else:
        axis.set_major_locator(MaxNLocator(integer=True, nbins=most))


def _ticks(vmin: float, vmax: float, *, nonfinite: bool) -> list[float]:
    """Integer powers of ten from vmin to vmax, about 7 at most, always with 1 (the tolerance)."""
    lo, hi = math.ceil(vmin), math.floor(vmax)
    step = max(1, math.ceil((hi - lo) / 6))
    ticks = set(range(0, lo - 1, -step)) | set(range(0, hi + 1, step))
    if nonfinite:
        ticks = {t for t in ticks if t <= hi - step} | {hi}
    return sorted(float(t) for t in ticks if lo <= t <= hi)


def _power_label(v: float, _pos: int | None = None) -> str:
    e = round(v)
    if e == 0:
        return "1 (tol)"
    if e >= math.log10(NONFINITE):
        return "1e9+ / NaN"
    return f"1e{e}"


def timestep_profile(panels: Sequence[Panel]) -> tuple[list[int], list[float]] | None:
    """Worst |error| / allowed at each timestep (max over the other axis), from the time panel.

    Returns (first original timestep of each cell, value) or None when no panel has a time axis.
    """
    for p in panels:
        if p.x_axis == "t":
            ts = [c * p.x_step for c in range(len(p.values[0]))]
            worst = [max(row[c] for row in p.values) for c in range(len(p.values[0]))]
            return ts, worst
    return None


def timestep_png(panels: Sequence[Panel], *, direction: str, first_bad_t: int | None = None,
                 quantity: str = "", scale: tuple[float, float] | None = None) -> str | None:
    """Error against timestep (log scale, tolerance drawn at 1), its vertical range ``scale`` (log10, as
    for the heatmaps); None without a time axis or with a single timestep (one dot says nothing)."""
    profile = timestep_profile(panels)
    if profile is None:
        return None
    import numpy as np
    from matplotlib.figure import Figure

    ts, worst = profile
    if len(ts) < 2:
        return None
    lo, hi = scale if scale is not None else report_scale(panels)
    values = np.clip(np.asarray(worst, dtype=float), _FLOOR, NONFINITE)
    fig = Figure(figsize=(6.2, 2.3), dpi=110)
    fig.subplots_adjust(left=0.75 / 6.2, right=1 - 0.15 / 6.2, bottom=0.48 / 2.3, top=1 - 0.3 / 2.3)
    ax = fig.subplots()
    ax.axhspan(_FLOOR / 10, 1.0, color="#eceff1", zorder=0)
    ax.axhline(1.0, color="#263238", linewidth=1, linestyle="--", zorder=1)
    ax.plot(ts, values, color="#c62828", marker="o", markersize=3.5, linewidth=1.4, zorder=3)
    over = values > 1.0
    ax.scatter(np.asarray(ts)[over], values[over], color="#4a0000", s=16, zorder=4)
    if first_bad_t is not None:
        ax.axvline(first_bad_t, color="#f57c00", linewidth=1, zorder=2)
        ax.annotate(f"first over: t={first_bad_t}", (first_bad_t, 1.0), xytext=(4, 6),
                    textcoords="offset points", fontsize=7, color="#e65100")
    ax.set_yscale("log")
    ax.set_ylim(10**lo / 2, 10**hi * 3)
    ax.set_xlim(-0.5, max(ts) + 0.5 if ts else 0.5)
    _index_ticks(ax.xaxis, max(ts) + 1 if ts else 1, 12)
    ax.set_xlabel("timestep t" + ("   (BPTT runs from the last step back, right to left)"
                                  if direction == "backward" else ""), fontsize=8)
    ax.set_ylabel("max |error| / allowed", fontsize=8)
    ax.set_title(f"{quantity}: worst error at each timestep" if quantity else "worst error at each timestep",
                 fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(True, which="major", axis="y", color="#cfd8dc", linewidth=0.5)
    return _png(fig)
