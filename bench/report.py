"""Result rows, the pass bars, and the outputs: console table, markdown and a PNG chart."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .util import human_bytes

PASS, FAIL, NA, ERROR, INFO = "PASS", "FAIL", "n/a", "ERROR", ""


@dataclass
class Goal:
    op: str                 # "<=" or ">="
    threshold: float
    on: str = "ratio"       # "ratio" (bams3 / anchor) or "value" (bams3's own value)
    label: str = ""         # how to show it; default "≤ 0.60×" / "≤ 3 requests"

    def text(self, unit: str) -> str:
        if self.label:
            return self.label
        sym = "≤" if self.op == "<=" else "≥"
        if self.on == "ratio":
            return f"{sym} {_num(self.threshold)}×"
        return f"{sym} {fmt_value(self.threshold, unit)}"

    def check(self, value: float) -> bool:
        eps = 1e-12
        return value <= self.threshold + eps if self.op == "<=" else value >= self.threshold - eps

    def miss(self, value: float, unit: str) -> str:
        """How far ``value`` is from the bar, in words."""
        shown = (f"{_num(value)}×" if self.on == "ratio" else fmt_value(value, unit))
        if self.threshold == 0:
            return f"{shown} vs {self.text(unit)}"
        if self.op == "<=":
            pct = (value / self.threshold - 1) * 100
            return f"{shown} is {pct:.0f}% over the bar ({self.text(unit)})"
        pct = (1 - value / self.threshold) * 100
        return f"{shown} is {pct:.0f}% short of the bar ({self.text(unit)})"


@dataclass
class Row:
    section: str
    figure: str
    unit: str                       # bytes | reads/s | s | requests | rss
    bams3: float | None = None
    anchor_name: str = ""
    anchor: float | None = None
    goal: Goal | None = None
    note: str = ""
    status: str = INFO              # PASS FAIL n/a ERROR or "" (informational)
    ratio: float | None = None
    bams3_text: str | None = None   # overrides the formatted value (e.g. "n/a (...)")
    chart: bool = True

    def evaluate(self) -> "Row":
        if self.ratio is None and self.bams3 is not None and self.anchor:
            self.ratio = self.bams3 / self.anchor
        if self.status in (NA, ERROR):
            return self
        if self.goal is not None:
            v = self.ratio if self.goal.on == "ratio" else self.bams3
            if v is None:
                self.status = NA
            else:
                self.status = PASS if self.goal.check(v) else FAIL
                if self.status == FAIL:
                    self.note = "; ".join(filter(None, [self.goal.miss(v, self.unit), self.note]))
        return self

    @property
    def missed_by(self) -> str:
        return self.note if self.status == FAIL else ""


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    if abs(x) >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2g}"


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit in ("bytes", "rss"):
        return human_bytes(v)
    if unit == "reads/s":
        return f"{v:,.0f} reads/s"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if unit == "requests":
        return f"{v:.0f} req"
    if unit == "bool":
        return "yes" if v else "no"
    return f"{_num(v)} {unit}".strip()


def cells(r: Row) -> list[str]:
    b = r.bams3_text if r.bams3_text is not None else fmt_value(r.bams3, r.unit)
    a = f"{r.anchor_name}: {fmt_value(r.anchor, r.unit)}" if r.anchor_name else "—"
    if r.anchor_name and r.anchor is None:
        a = r.anchor_name
    ratio = f"{_num(r.ratio)}×" if r.ratio is not None else "—"
    goal = r.goal.text(r.unit) if r.goal else "—"
    return [r.figure, b, a, ratio, goal, r.status or "info"]


HEAD = ["figure", "bams3", "anchor", "ratio", "goal", "pass"]


def markdown_table(rows: list[Row]) -> str:
    out = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    section = None
    for r in rows:
        if r.section != section:
            section = r.section
            out.append(f"| **{section}** | | | | | |")
        c = cells(r)
        c = [x.replace("|", "\\|") for x in c]
        if r.status == FAIL:
            c[5] = "**FAIL**"
        out.append("| " + " | ".join(c) + " |")
    return "\n".join(out)


def console_table(rows: list[Row]) -> str:
    data = [HEAD] + [cells(r) for r in rows]
    w = [min(60, max(len(row[i]) for row in data)) for i in range(len(HEAD))]
    lines = []
    section = None
    for i, row in enumerate(data):
        if i > 0 and rows[i - 1].section != section:
            section = rows[i - 1].section
            lines.append(f"-- {section} " + "-" * max(0, sum(w) + 3 * len(w) - len(section) - 4))
        lines.append("  ".join(c[:60].ljust(w[j]) for j, c in enumerate(row)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * x for x in w))
    return "\n".join(lines)


def bar_lines(rows: list[Row]) -> list[str]:
    """One line per pass bar: PASS/FAIL (or n/a / ERROR) and by how much it was missed."""
    out = []
    for r in rows:
        if r.goal is None:
            continue
        v = r.ratio if r.goal.on == "ratio" else r.bams3
        shown = "—" if v is None else (f"{_num(v)}×" if r.goal.on == "ratio"
                                       else fmt_value(v, r.unit))
        line = f"{r.status or NA:5} {r.section}: {r.figure}: {shown} (goal {r.goal.text(r.unit)})"
        if r.status == FAIL:
            line += f" -- MISSED: {r.note}"
        elif r.status in (NA, ERROR) and r.note:
            line += f" -- {r.note}"
        out.append(line)
    return out


def write_markdown(path: Path, rows: list[Row], *, title: str, preamble: list[str],
                   details: list[str]) -> None:
    bars = [r for r in rows if r.goal is not None]
    n_pass = sum(r.status == PASS for r in bars)
    n_fail = sum(r.status == FAIL for r in bars)
    n_other = len(bars) - n_pass - n_fail
    md = [f"# {title}", "", *preamble, "",
          f"**Bars: {n_pass} PASS, {n_fail} FAIL" + (f", {n_other} not measured" if n_other else "")
          + f" (of {len(bars)}).** Ratios are bams3 ÷ anchor, both measured in this run.", "",
          markdown_table(rows), ""]
    missed = [r for r in bars if r.status == FAIL]
    if missed:
        md += ["## Missed bars", ""]
        md += [f"- **{r.section}: {r.figure}** — {r.note}" for r in missed]
        md.append("")
    notmeasured = [r for r in rows if r.status in (NA, ERROR)]
    if notmeasured:
        md += ["## Not measured / errors", ""]
        groups: dict = {}
        for r in notmeasured:
            groups.setdefault((r.section, r.status, r.note or r.bams3_text or ""), []).append(r.figure)
        md += [f"- {sec} ({', '.join(figs)}) — {st}: {why}"
               for (sec, st, why), figs in groups.items()]
        md.append("")
    md += details
    path.write_text("\n".join(md) + "\n")


def _short_label(r: Row) -> str:
    section = re.sub(r"\s*\([^)]*\)", "", r.section)
    label = f"{section}: {r.figure}"
    return label if len(label) <= 72 else label[:71] + "…"


def write_chart(path: Path, rows: list[Row], sweep: list[dict] | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r.chart and r.ratio is not None and r.ratio > 0]
    has_sweep = bool(sweep) and any(s.get("seconds") for s in sweep)
    fig_h = max(4.0, 0.32 * len(pts) + 1.5)
    if has_sweep:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(15, fig_h),
                                      gridspec_kw={"width_ratios": [3, 1.2]})
    else:
        fig, ax = plt.subplots(figsize=(11, fig_h))
        ax2 = None
    colors = {PASS: "#2e7d32", FAIL: "#c62828"}
    y = list(range(len(pts)))[::-1]
    for yi, r in zip(y, pts):
        ax.barh(yi, r.ratio, color=colors.get(r.status, "#90a4ae"), height=0.7)
        if r.goal is not None and r.goal.on == "ratio":
            ax.plot([r.goal.threshold] * 2, [yi - 0.42, yi + 0.42], color="black", lw=2)
        label = f" {_num(r.ratio)}×"
        if r.goal is not None and r.goal.on == "value":  # the bar is on bams3's own value
            label += f"  ({fmt_value(r.bams3, r.unit)}; goal {r.goal.text(r.unit)})"
        ax.text(r.ratio, yi, label, va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([_short_label(r) for r in pts], fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("bams3 ÷ anchor (log scale; black tick = goal; green PASS, red FAIL, grey info)")
    ax.set_title(title, fontsize=10)
    if ax2 is not None:
        parts = sorted({s["part_mib"] for s in sweep})
        concs = sorted({s["concurrency"] for s in sweep})
        import numpy as np

        grid = np.full((len(parts), len(concs)), np.nan)
        for s in sweep:
            if s.get("seconds"):
                grid[parts.index(s["part_mib"]), concs.index(s["concurrency"])] = s["seconds"]
        im = ax2.imshow(grid, cmap="viridis_r", aspect="auto")
        ax2.set_xticks(range(len(concs)), [str(c) for c in concs])
        ax2.set_yticks(range(len(parts)), [f"{p:g} MiB" for p in parts])
        ax2.set_xlabel("--s3-concurrency")
        ax2.set_ylabel("--s3-part-size")
        ax2.set_title("convert → S3 wall time (s)", fontsize=10)
        for i in range(len(parts)):
            for j in range(len(concs)):
                if not math.isnan(grid[i, j]):
                    ax2.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", color="white",
                             fontsize=9)
        fig.colorbar(im, ax=ax2, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
