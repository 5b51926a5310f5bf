"""The schedules' shape beside the authors' logs (harness/report/shape.py), on runs written by the harness's own
writers to sqlite and read back with load_study: the reduced scale that matches no log exactly still gets the
authors' CLR and step-schedule curves beside its own, each on its run's own clock."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from real_path_store import write  # noqa: E402

from harness.analysis.results import load_study  # noqa: E402
from harness.report import shape  # noqa: E402
from harness.report.figures import reference_for_cells  # noqa: E402


def test_the_authors_logs_come_from_the_studys_paper_scale():
    logs = shape.authors_logs_by_schedule("super_convergence")
    assert logs == {"triangular": [("clr3SS5kFig1a", 10000)], "multistep": [("lr35Fig1a", 80000)]}
    assert shape.authors_logs_by_schedule("activation_mystery") == {}   # an MLP on MNIST: no log of the authors'
    assert shape.authors_logs_by_schedule("no_such_study") == {}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('shape')}/mlflow.db"
    written = write(uri, "super_convergence", "quick", "claimed")
    return load_study("super_convergence", uri, run=written.parent, curves=True)


def test_the_quick_scale_gets_the_shapes_on_each_runs_clock(quick):
    t, curves = quick.trials, quick.curves
    assert reference_for_cells(t) == {}            # no exact match: the iteration-for-iteration overlay is empty
    fig = plt.figure(figsize=(8, 3.3))
    shape.draw_shapes(fig, [0, 0, 1, 1], t, curves, shape.authors_logs_by_schedule("super_convergence"))
    axes = [ax for ax in fig.axes if ax.get_lines()]
    assert [ax.get_title() for ax in axes] == ["triangular", "multistep"]
    for ax in axes:
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        ours = [ln for label, ln in lines.items() if label.startswith("ours")]
        theirs = [ln for label, ln in lines.items() if label.startswith("authors' log")]
        assert ours and len(theirs) == 1
        for ln in ours + theirs:                   # every curve ends at the end of its own run
            assert max(ln.get_xdata()) == pytest.approx(1.0)
            assert 0 <= min(ln.get_xdata()) < 0.2
        assert all(0 <= y <= 100 for ln in ours + theirs for y in ln.get_ydata())   # percent, not fractions
        assert all(ln.get_ydata()[-1] >= 30 for ln in ours + theirs)
    tri = {ln.get_label() for ln in axes[0].get_lines()}
    assert any("300 steps" in label for label in tri) and any("150 steps" in label for label in tri)
    assert any("clr3SS5kFig1a, 10,000 steps" in label for label in tri)
    # two cells of one schedule differ in line style as well as colour
    styles = {ln.get_linestyle() for ln in axes[0].get_lines() if ln.get_label().startswith("ours")}
    assert len(styles) == 2
    plt.close(fig)
