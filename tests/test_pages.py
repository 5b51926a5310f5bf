"""Pages that earn their space (issue 18): filled pages, distinct colours with line styles, no panel of a constant or
of a pool of unlike cells, short labels on at most two lines, and the paper's own column in the setup table.
The reports are built from the synthetic sqlite store (tests/synthetic_store.py); no Ray, no MLflow server."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from harness.report import build as report
from harness.report import figures as figs
from harness.report import pdf as rpdf
from harness.report import setup as rsetup

try:
    from tests.synthetic_store import synthetic_uri
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from synthetic_store import synthetic_uri

STUDIES = ["super_convergence", "batch_size_effect", "momentum_effect", "weight_decay", "smoke_check"]


@pytest.fixture(scope="module")
def uri():
    return synthetic_uri()


@pytest.fixture(scope="module")
def built(uri, tmp_path_factory):
    """study -> (the FlowPdf's page layout, the lowest inked row of each rendered page in inches from the top)."""
    out, pages = {}, {}
    flush = rpdf.FlowPdf._flush

    def measuring_flush(self, section_last=True):
        if self.fig is not None:      # render the page as drawn, 20 dpi: where is the lowest ink above the footer?
            dpi, buf = 20, io.BytesIO()
            self.fig.savefig(buf, format="rgba", dpi=dpi)
            img = np.frombuffer(buf.getvalue(), np.uint8).reshape(round(rpdf.PAGE_H * dpi), -1, 4)[:, :, :3]
            rows = np.flatnonzero((img < 200).any(axis=(1, 2)))
            body = rows[rows < (rpdf.PAGE_H - rpdf.MARGIN_BOTTOM + 0.05) * dpi]
            pages.setdefault(self._study, []).append(body.max() / dpi if len(body) else 0.0)
        flush(self, section_last)

    folder, close = tmp_path_factory.mktemp("pages"), rpdf.FlowPdf.close
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rpdf.FlowPdf, "_flush", measuring_flush)
        for study in STUDIES:
            layouts = []
            mp.setattr(rpdf.FlowPdf, "_study", study, raising=False)
            mp.setattr(rpdf.FlowPdf, "close",
                       lambda self, layouts=layouts: (close(self), layouts.append(self.layout))[0])
            report.build_report(study, uri, out=folder / f"{study}.pdf", mlflow=False)
            out[study] = (layouts[0], pages[study])
    return out


@pytest.mark.parametrize("study", STUDIES)
@pytest.mark.slow  # trains or builds every study's report: seconds, the full suite's
def test_every_page_but_a_sections_last_is_at_least_half_filled(built, study):
    layout, ink = built[study]
    assert len(layout) == len(ink) >= 3
    assert layout[-1]["section_last"] and layout[0]["page"] == 1
    thin = [p for p in layout if p["fill"] < rpdf.MIN_FILL and not p["section_last"]]
    assert thin == [], thin
    for p, lowest in zip(layout, ink):   # the layout's fill is what was drawn: the ink ends where the flow did
        drawn = (lowest - rpdf.MARGIN_TOP) / rpdf.CONTENT_H
        assert drawn == pytest.approx(p["fill"], abs=0.08), (p, drawn)


def test_the_fill_check_catches_a_half_empty_page(tmp_path):
    with rpdf.FlowPdf(tmp_path / "x.pdf") as pdf:
        pdf.new_page()
        pdf.paragraph("one line, then a table row too tall for the rest of the page")
        pdf.table(["a"], [["\n".join(["x"] * 60)]], widths=[1.0], max_lines=60)
    assert [p["page"] for p in pdf.underfilled()] == [1]
    assert [p["section_last"] for p in pdf.layout] == [False, True]


def test_a_figure_shrinks_into_a_half_empty_page_instead_of_leaving_it(tmp_path):
    with rpdf.FlowPdf(tmp_path / "x.pdf") as pdf:
        pdf.new_page()
        pdf.space(3.0)
        pdf.figure(lambda fig, rect: fig.add_axes(rect), height=5.0)    # 4.3 in left: shrinks to fit
        pdf.figure(lambda fig, rect: fig.add_axes(rect), height=5.0)    # a full page: the next page
    assert pdf.pages == 2 and pdf.underfilled() == []


def _lab(c) -> np.ndarray:
    rgb = np.array(to_rgb(c))
    rgb = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ rgb
    f = np.cbrt(np.maximum(xyz / np.array([0.95047, 1.0, 1.08883]), 0.008856))
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_palette_colours_are_far_apart():
    """No near-identical pair (CIE76 distance; colorblind's orange/vermilion and blue/sky blue were ~25)."""
    for k in (4, 6, len(figs.PALETTE)):
        dist = min(np.linalg.norm(_lab(a) - _lab(b)) for a, b in itertools.combinations(figs.PALETTE[:k], 2))
        assert dist >= (45 if k == 4 else 30), (k, dist)


def _trials(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["cell"] = [",".join(f"{k}={r[k]}" for k in ("batch_size", "schedule", "momentum")) for r in rows]
    df["run_id"] = [f"r{i}" for i in range(len(df))]
    return df


def test_colour_and_line_style_encode_the_varied_fields():
    grid = [{"batch_size": b, "max_lr": b / 1000, "schedule": s, "momentum": 0.9, "seed": k}
            for b in (256, 512, 1024) for s in ("one_cycle", "multistep") for k in (0, 1)]
    t = _trials(grid)
    assert figs.varied_fields(t) == ["batch_size", "schedule"]     # max_lr varies with the batch: one factor
    cells = list(dict.fromkeys(t["cell"]))
    enc = figs.encode(t, cells)
    assert (enc.hue, enc.dash) == ("batch_size", "schedule")
    assert len({enc.color[c] for c in cells}) == 3 and len({enc.style[c] for c in cells}) == 2
    assert len({(enc.color[c], enc.style[c]) for c in cells}) == 6
    one = _trials([{"batch_size": b, "max_lr": 1.0, "schedule": "one_cycle", "momentum": 0.9, "seed": 0}
                   for b in (256, 512)])
    enc = figs.encode(one, list(one["cell"]))
    assert enc.hue == enc.dash == "batch_size" and len(set(enc.style.values())) == 2   # both cues on one field


def test_pools_and_constants_are_detected():
    t = _trials([{"batch_size": 1000, "max_lr": 1.0, "schedule": "one_cycle", "momentum": m, "seed": k}
                 for m in (0.8, 0.9) for k in (0, 1)])
    assert figs.pooled(t, ["schedule"]) and not figs.pooled(t, ["momentum"])
    assert not figs.carries([0.0] * 5) and not figs.carries([0.1, 0.1]) and figs.carries([0.1, 0.2])
    sched = pd.DataFrame({"cell": list(t["cell"].unique()) * 3, "step": [0, 0, 1, 1, 2, 2], "lr": 0.1,
                          "momentum": [0.8, 0.9] * 3})
    assert figs.schedule_panels(t, sched) == [("momentum", "momentum")]            # a constant LR: no panel
    assert figs.schedule_panels(t, sched.assign(momentum=0.0)) == []              # nor a momentum of zero


def test_claim_panel_never_pools_unlike_cells():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    t = _trials([{"batch_size": 1000, "max_lr": 1.0, "schedule": "one_cycle", "momentum": m, "seed": k,
                  "outcome_acc": 0.9, "status": "completed", "cell_title": f"momentum {m}"}
                 for m in (0.8, 0.9, 0.95) for k in (0, 1)])
    ax = Figure().add_subplot()
    figs.draw_levels(ax, t, "schedule")                          # one schedule: one median over 3 cells
    assert ax.get_xlabel() == "schedule" and ax.get_legend().get_title().get_text() == "momentum"
    assert len(ax.collections) == 3 * 2                          # per momentum: its points and its median bar


def test_short_labels_fit_on_two_lines():
    names = [f"inverted images, no final ReLU, seed {k}" for k in range(3)]
    rows = [[n, "0123456789abcdef0123456789abcdef", "completed"] for n in names]
    widths = rpdf.fit_widths(["trial (run name)", "MLflow run id", "status"], rows, [1.0, 2.5, 2.0], 5.5, 8.0)
    assert sum(widths) == pytest.approx(5.5)
    assert max(len(rpdf.wrap(n, widths[0] - 0.08, 8.0)) for n in names) <= 2
    assert len(rpdf.wrap(names[0], 1.0 / 5.5 * 5.5 - 0.08, 8.0)) >= 3          # as given, it would wrap on 3


@pytest.mark.slow  # trains or builds every study's report: seconds, the full suite's
def test_setup_table_has_the_paper_beside_the_studys_paper_scale(built, uri, tmp_path):
    assert rsetup.columns("quick")[1:3] == ["this study's paper scale", "the reference runs"]
    from harness import spec as specs
    spec = specs.load_spec("super_convergence")
    side = rsetup.paper_side("super_convergence", None)
    rows = {r[0]: r for r in rsetup.paper_vs_run(side.configs, side.configs, spec, side.spec)}
    # the reference column: the runs the paper scale's cells name (clr3SS5kFig1a, lr35Fig1a, the SC2 records
    # derived from clr3SS5kFig1a), in the same words as the study's columns
    assert rows["steps (epochs) per cell"][2] == (
        "batch 1000, CLR triangular: 2,000 steps (40.0 epochs); batch 1000, CLR triangular: 6,000 steps (120.0 "
        "epochs); batch 1000, CLR triangular: 10,000 steps (200.0 epochs); batch 1000, CLR triangular: 20,000 "
        "steps (400.0 epochs); batch 1000, multistep: 80,000 steps (1600.0 epochs)")
    assert rows["BN statistics over"][2] == "125 images"
    assert rows["BN momentum (PyTorch convention)"][2] == "0.05; 0.001"      # moving-average fraction 0.95, 0.999
    assert rows["claims and their setup"][2].startswith("SC1: C10, ResNet-56, batch 1000")
    for unknown in ("LR tuning", "target accuracy"):
        assert rows[unknown][2] == "-", unknown                  # the logs say nothing: not the study's value
        assert rows[unknown][1] != "-"
    da2 = {r[0]: r[2] for r in rsetup.paper_vs_run([], [], specs.load_spec("batch_size_effect"), None)}
    assert da2["claims and their setup"].startswith("DA2: ResNet-56, TBS/epochs 128/48")
    assert da2["model"] == "gresnet56"                           # the DA author's TBS 512 log documents DA2
    files = report.build_report("super_convergence", uri, out=tmp_path / "x.pdf", mlflow=False)
    md = files.markdown.read_text()
    assert "| setting | this study's paper scale | the reference runs | this run (quick scale) |" in md
