"""The front's pictures: references in the legend, arrows to recovered points, fp32-relative axes."""

from __future__ import annotations

from slimtune.plots import axes_of, html_figure, recovery_arrows, reference_label, write_html, write_png
from slimtune.search.records import TrialRecord


def _record(number, accuracy, latency, size, reference="", recovered_from=None):
    return TrialRecord(number, str(number), {"ffn.sparsity": 0.25}, "completed",
                       {"accuracy": accuracy, "latency_ms": latency, "size_mb": size}, reference=reference,
                       recovered_from=recovered_from)


def _search():
    return [_record(0, 0.90, 200.0, 90.0, "fp32"), _record(1, 0.895, 190.0, 24.0, "uniform-int8"),
            _record(2, 0.894, 189.0, 23.5, "uniform-int8-ffn25"), _record(3, 0.70, 80.0, 12.0),
            _record(4, 0.80, 120.0, 30.0), _record(5, 0.86, 82.0, 12.5, recovered_from=3)]


def test_references_are_named_one_click_marked_and_recovered_points_linked_to_their_source():
    records = _search()
    front = {0, 1, 5}
    assert reference_label(records[1], front) == "uniform-int8 (one-click int8) [front]"
    assert reference_label(records[2], front) == "uniform-int8-ffn25"
    assert [(a.number, b.number) for a, b in recovery_arrows(records)] == [(3, 5)]
    latency, size = axes_of(records)
    assert (latency.fp32, size.fp32) == (200.0, 90.0) and "per batch" in latency.label
    assert axes_of(records[1:])[0].fp32 is None  # no fp32 measured: no relative axis


def test_the_png_and_html_carry_the_legend_arrows_and_the_fp32_switch(tmp_path):
    import matplotlib.image

    records = _search()
    write_png(tmp_path / "pareto.png", records, {0, 1, 5}, "accuracy", {2})
    height, width, _ = matplotlib.image.imread(tmp_path / "pareto.png").shape
    assert width > 1200 and height > 400
    write_html(tmp_path / "pareto.html", records, {0, 1, 5}, "accuracy", {2})
    assert (tmp_path / "pareto.html").stat().st_size > 100_000  # plotly.js inside: opens offline
    figure = html_figure(records, {0, 1, 5}, "accuracy", {2})
    (arrow,) = figure.layout.annotations
    assert (arrow.ax, arrow.x) == (80.0, 82.0)
    ms, relative = figure.layout.updatemenus[0].buttons
    assert (ms.label, relative.label) == ("ms", "x fp32")
    assert relative.args[1]["annotations"][0]["ax"] == 80.0 / 200.0
    names = [trace.name for trace in figure.data]
    assert "uniform-int8 (one-click int8) [front]" in names and "fp32 [front]" in names
    assert any("x0.95 fp32" in text for trace in figure.data for text in (trace.text or ()))
