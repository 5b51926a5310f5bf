"""A small flow layout on matplotlib's PdfPages: headings, wrapped paragraphs, tables that break across
pages, and figure blocks. Text is real text (TrueType, `pdf.fonttype` 42), figures are vector graphics.

    with FlowPdf(path, footer="study x") as pdf:
        pdf.heading("Verdicts")
        pdf.paragraph("Long text ...")
        pdf.table(["a", "b"], [["1", "2"]], widths=[0.3, 0.7])
        pdf.figure(lambda fig, rect: ..., height=3.0)   # rect = (left, bottom, width, height), figure fractions

Each page's filled height is recorded in `pdf.layout` (page, section, fill, section_last); `pdf.underfilled()` lists
the pages under half filled that are not their section's last page (tests/test_pages.py: there are none). A figure
that does not fit on a page less than half filled shrinks to the room left (down to `min_height`) instead of
leaving the page half empty, and a table's columns are widened from those with slack so that short labels do not
wrap over three lines (`fit_widths`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import matplotlib
import matplotlib.lines
import matplotlib.text

matplotlib.use("Agg")
MIN_FONT = 8.0    # no text on a page is smaller (points); `FlowPdf.min_font` measures it on every page
matplotlib.rcParams.update({"pdf.fonttype": 42, "ps.fonttype": 42, "font.family": "DejaVu Sans",
                            "axes.titlesize": 9, "axes.labelsize": 8.5, "xtick.labelsize": 8,
                            "ytick.labelsize": 8, "legend.fontsize": 8, "legend.title_fontsize": 8,
                            "svg.fonttype": "none"})
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

PAGE_W, PAGE_H = 11.69, 8.27          # A4 landscape, inches
MARGIN_X, MARGIN_TOP, MARGIN_BOTTOM = 0.5, 0.45, 0.5
LINE = 1.22                            # line height in font sizes
CONTENT_H = PAGE_H - MARGIN_TOP - MARGIN_BOTTOM
MIN_FILL = 0.5                         # a page that the flow leaves for the next one is at least this full
_RENDERER = RendererAgg(100, 100, 72)  # 72 dpi: widths come out in points


@functools.lru_cache(maxsize=200_000)
def text_width(text: str, size: float, bold: bool = False) -> float:
    """Width of one line of text in inches."""
    prop = FontProperties(family="DejaVu Sans", size=size, weight="bold" if bold else "normal")
    w, _, _ = _RENDERER.get_text_width_height_descent(text, prop, ismath=False)
    return w / 72.0


def wrap(text: str, width_in: float, size: float, bold: bool = False) -> list[str]:
    """Greedy word wrap by measured width; long tokens break after ',' ';' '/' or anywhere."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        words = para.split(" ")
        cur = ""
        for w in words:
            cand = f"{cur} {w}" if cur else w
            if text_width(cand, size, bold) <= width_in * 0.98:
                cur = cand
                continue
            if cur:
                lines.append(cur)
            cur = ""
            while text_width(w, size, bold) > width_in:    # a token wider than the column
                cut = _cut(w, width_in, size, bold)
                lines.append(w[:cut])
                w = w[cut:]
            cur = w
        lines.append(cur)
    return lines


def _cut(token: str, width_in: float, size: float, bold: bool) -> int:
    n = 1
    while n < len(token) and text_width(token[: n + 1], size, bold) <= width_in:
        n += 1
    for sep in ",;/_=":
        i = token.rfind(sep, 0, n)
        if i > n // 3:
            return i + 1
    return n


def _natural(texts, size: float, bold: bool = False) -> float:
    """The width of the longest line of these texts, unwrapped (inches)."""
    return max((text_width(line, size, bold) for t in texts for line in str(t).split("\n")), default=0.0)


def width_for(texts, lines: int, size: float, bold: bool = False, pad: float = 0.08) -> float:
    """The narrowest column (inches, padding included) in which every text wraps to at most `lines` lines."""
    texts = list(dict.fromkeys(str(t) for t in texts))

    def needed(w):
        return max((len(wrap(t, w, size, bold)) for t in texts), default=1)

    lo, hi = 0.1, _natural(texts, size, bold) + 0.05
    for _ in range(7):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if needed(mid) <= lines else (mid, hi)
    return hi + pad


def fit_widths(columns, rows, widths, total: float, size: float, max_lines: int = 2) -> list[float]:
    """Column widths in inches: the given fractions of `total`, except that a column whose cells would wrap over
    `max_lines` lines, and would not at up to twice its width, takes the width it needs from columns with slack
    (wider than their longest cell) and then from columns of long text (at most a quarter of theirs)."""
    pad = 0.08
    col_w = [w / sum(widths) * total for w in widths]
    cells = [[str(r[j]) for r in rows] for j in range(len(columns))]
    natural = [_natural(c, size) + pad for c in cells]
    want = {}
    for j, w in enumerate(col_w):
        if natural[j] > w and natural[j] <= 2 * max_lines * w:      # wraps, but a wider column could help
            fits = width_for(cells[j], max_lines, size, pad=pad)
            if w < fits <= 2 * w:
                want[j] = fits - w
    if not want:
        return col_w
    head = [_natural(str(h).split(" "), size, bold=True) + pad for h in columns]
    slack = {j: col_w[j] - max(natural[j], head[j]) for j in range(len(col_w))
             if j not in want and col_w[j] > max(natural[j], head[j])}
    long_text = {j: 0.25 * col_w[j] for j in range(len(col_w)) if j not in want and j not in slack
                 and natural[j] > 2 * max_lines * col_w[j]}
    for donors in (slack, long_text):
        for j in want:
            for d in donors:
                give = min(want[j], donors[d])
                col_w[j] += give
                col_w[d] -= give
                donors[d] -= give
                want[j] -= give
    return col_w


class FlowPdf:
    def __init__(self, path, footer: str = "", metadata: dict | None = None):
        self.pdf = PdfPages(path, metadata={"Creator": "harness.report", "CreationDate": None, **(metadata or {})})
        self.footer = footer
        self.fig: Figure | None = None
        self.y = 0.0        # inches from the top of the page
        self.pages = 0
        self.min_font = float("inf")   # the smallest visible text drawn on any page so far (points)
        self.small_texts: list[tuple[int, float, str]] = []   # (page, size, text) of texts under MIN_FONT
        self.layout: list[dict] = []   # per page: page, section, fill (fraction of the content height), section_last
        self.sections = 0

    # ------------------------------------------------------------------ pages
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def width(self) -> float:
        return PAGE_W - 2 * MARGIN_X

    @property
    def room(self) -> float:
        return PAGE_H - MARGIN_BOTTOM - self.y

    @property
    def fill(self) -> float:
        """The fraction of this page's content height used so far."""
        return 0.0 if self.fig is None else min(1.0, max(0.0, (self.y - MARGIN_TOP) / CONTENT_H))

    def underfilled(self, min_fill: float = MIN_FILL) -> list[dict]:
        """Pages under `min_fill` that the flow left for the next page within the same section."""
        return [p for p in self.layout if p["fill"] < min_fill and not p["section_last"]]

    def new_page(self, flow: bool = False) -> None:
        """A new page; `flow`: the current section goes on there (else a section starts on it)."""
        if not flow:
            self.sections += 1
        self._flush(section_last=not flow)
        self.fig = Figure(figsize=(PAGE_W, PAGE_H))
        self.y = MARGIN_TOP
        self.pages += 1
        self.fig.text(PAGE_W - MARGIN_X, 0.25, f"{self.footer}   page {self.pages}", ha="right", va="bottom",
                      fontsize=MIN_FONT, color="0.4", transform=self._tr())

    def _ensure(self, height: float) -> None:
        if self.fig is None or (height > self.room and self.y > MARGIN_TOP + 1e-6):
            self.new_page(flow=self.fig is not None)

    def _flush(self, section_last: bool = True) -> None:
        if self.fig is not None:
            self.layout.append({"page": self.pages, "section": self.sections, "fill": self.fill,
                                "section_last": section_last})
            self.pdf.savefig(self.fig)
            self._measure(self.fig)   # after drawing: tick labels and legends exist now
            self.fig = None

    def _measure(self, fig: Figure) -> None:
        """Record the smallest font size of the visible, non-empty texts of a drawn page."""
        for t in fig.findobj(matplotlib.text.Text):
            if not t.get_visible() or not t.get_text().strip():
                continue
            ax = getattr(t, "axes", None)
            if ax is not None and not ax.get_visible():
                continue
            size = float(t.get_fontsize())
            self.min_font = min(self.min_font, size)
            if size < MIN_FONT:
                self.small_texts.append((self.pages, size, t.get_text()[:60]))

    def close(self) -> int:
        self._flush()
        self.pdf.close()
        return self.pages

    def _tr(self):
        from matplotlib.transforms import Affine2D
        return Affine2D().scale(1 / PAGE_W, 1 / PAGE_H) + self.fig.transFigure

    def _text(self, x: float, y_top: float, s: str, size: float, **kw) -> None:
        """Lines of text below y_top (inches from the page top), x inches from the left, on common baselines."""
        kw.pop("linespacing", None)
        for i, line in enumerate(s.split("\n")):
            baseline = y_top + (0.8 + i * LINE) * size / 72
            self.fig.text(x / PAGE_W, 1 - baseline / PAGE_H, line, fontsize=size, va="baseline", ha="left", **kw)

    # ------------------------------------------------------------------ flow elements
    def space(self, h: float) -> None:
        self.y += h

    def section(self, min_room: float) -> None:
        """Start a section: on a new page unless at least `min_room` inches are left on this one (60% of it on a
        page less than half filled: its figures shrink to fit, see `figure`)."""
        if self.fig is None or self.room < (0.6 * min_room if self.fill < MIN_FILL else min_room):
            self.new_page()
        else:
            self.sections += 1
            self.y += 0.15

    def heading(self, text: str, size: float = 13, keep_with: float = 1.0) -> None:
        if self.fig is not None and self.y > MARGIN_TOP + 1e-6:
            self.y += 0.08
        lines = wrap(text, self.width, size, bold=True)
        self._ensure(len(lines) * size * LINE / 72 + keep_with)
        self._text(MARGIN_X, self.y, "\n".join(lines), size, weight="bold")
        self.y += len(lines) * size * LINE / 72 + 0.06

    def paragraph(self, text: str, size: float = 8.5, color: str = "black", indent: float = 0.0) -> None:
        lh = size * LINE / 72
        for line in wrap(text, self.width - indent, size):
            self._ensure(lh)
            self._text(MARGIN_X + indent, self.y, line, size, color=color)
            self.y += lh
        self.y += 0.05

    def table_height(self, columns: Sequence[str], rows: Sequence[Sequence[str]], widths: Sequence[float],
                     size: float = 7.0) -> float:
        """Inches the table would take on one page (as `table` lays it out)."""
        pad, lh = 0.04, size * LINE / 72
        col_w = fit_widths(columns, rows, widths, self.width, size)
        h = max(len(wrap(c, w - 2 * pad, size, bold=True)) for c, w in zip(columns, col_w)) * lh + 2 * pad
        for row in rows:
            h += max(len(wrap(str(c), w - 2 * pad, size)) for c, w in zip(row, col_w)) * lh + 2 * pad
        return h + 0.12

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[str]], widths: Sequence[float],
              size: float = 7.0, styles: Sequence[dict] | None = None, max_lines: int = 40,
              header: bool = True) -> None:
        """A wrapped table; rows never split; the header repeats on each new page. widths: fractions."""
        pad = 0.04
        col_w = fit_widths(columns, rows, widths, self.width, size)
        lh = size * LINE / 72
        head = [wrap(c, w - 2 * pad, size, bold=True) for c, w in zip(columns, col_w)]
        head_h = max(len(h) for h in head) * lh + 2 * pad

        def draw_header():
            if not header:
                self._rows_line(self.y)
                return
            self._rows_line(self.y)
            x = MARGIN_X
            for lines, w in zip(head, col_w):
                self._text(x + pad, self.y + pad, "\n".join(lines), size, weight="bold", linespacing=LINE)
                x += w
            self.y += head_h
            self._rows_line(self.y, lw=0.6)

        self._ensure(head_h + lh * 2 + 2 * pad)
        draw_header()
        for i, row in enumerate(rows):
            style = (styles[i] if styles else None) or {}
            cells = [wrap(str(c), w - 2 * pad, size, bold=style.get(j, {}).get("weight") == "bold")[:max_lines]
                     for j, (c, w) in enumerate(zip(row, col_w))]
            h = max(len(c) for c in cells) * lh + 2 * pad
            if h > self.room:
                self.new_page(flow=True)
                draw_header()
            x = MARGIN_X
            for j, (lines, w) in enumerate(zip(cells, col_w)):
                kw = style.get(j, {})
                self._text(x + pad, self.y + pad, "\n".join(lines), size, linespacing=LINE, **kw)
                x += w
            self.y += h
            self._rows_line(self.y, lw=0.3, color="0.75")
        self.y += 0.12

    def _rows_line(self, y: float, lw: float = 0.8, color: str = "black") -> None:
        yy = 1 - y / PAGE_H
        self.fig.add_artist(matplotlib.lines.Line2D([MARGIN_X / PAGE_W, 1 - MARGIN_X / PAGE_W], [yy, yy], lw=lw,
                                                    color=color))

    def figure(self, draw: Callable[[Figure, tuple], None], height: float, min_height: float | None = None) -> None:
        """Reserve `height` inches (a new page if needed) and let draw(fig, rect) fill the rectangle. On a page less
        than half filled a figure that does not fit shrinks to the room left if that is at least `min_height`
        (default: 60% of `height`, at least 1.8 in)."""
        height = min(height, CONTENT_H)
        min_height = max(1.8, 0.6 * height) if min_height is None else min_height
        if self.fig is not None and height > self.room and self.fill < MIN_FILL and self.room - 0.1 >= min_height:
            height = self.room - 0.1
        self._ensure(height)
        rect = (MARGIN_X / PAGE_W, 1 - (self.y + height) / PAGE_H, self.width / PAGE_W, height / PAGE_H)
        draw(self.fig, rect)
        self.y += height + 0.1
