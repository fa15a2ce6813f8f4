"""The pictures of a search's front: ``pareto.png`` (static, two panels: the searched metric
against latency and against size) and ``pareto.html`` (interactive, hover shows the plan).

What the reader has to see at a glance: the front (red) against everything dominated (grey); each
reference point (fp32, the one-click uniform compression, the sensitivity seeds...) as its own
marker in the legend, never as text piled on a cluster of points; an arrow from each sampled plan to
its distilled (recovered) version, which is what recovery bought; and, where the search measured
fp32, the latency and size as multiples of fp32's (a top axis in the picture, a switch in the
HTML), so fronts from two machines can be laid side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from slimtune.config import METRIC_GOALS
from slimtune.search.records import TrialRecord

ONE_CLICK = {"uniform-int8": "one-click int8", "uniform-int4": "one-click 4-bit"}
"""The references a one-command tool would produce (ONNX Runtime's dynamic int8 quantization, a
4-bit weight-only builder): what the front has to beat."""

_MARKERS = ("s", "D", "^", "v", "P", "X", "<", ">", "p", "h", "8", "*")  # matplotlib; plotly names below
_PLOTLY_MARKERS = ("square", "diamond", "triangle-up", "triangle-down", "cross", "x", "triangle-left",
                   "triangle-right", "pentagon", "hexagon", "octagon", "star")
_REFERENCE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


@dataclass(frozen=True)
class Axis:
    """One x axis: the figure's key in ``metrics``, its label, and its unit's fp32 value (None when
    the search has no fp32 point to divide by)."""

    key: str
    label: str
    fp32: float | None


def reference_label(record: TrialRecord, pareto: set[int]) -> str:
    name = record.reference + (f" ({ONE_CLICK[record.reference]})" if record.reference in ONE_CLICK else "")
    return name + (" [front]" if record.number in pareto else "")


def recovery_arrows(completed: list[TrialRecord]) -> list[tuple[TrialRecord, TrialRecord]]:
    """(sampled plan, its distilled version) for every recovered point whose source was measured."""
    by_number = {r.number: r for r in completed}
    return [(by_number[r.recovered_from], r) for r in completed
            if r.recovered_from is not None and r.recovered_from in by_number]


def axes_of(completed: list[TrialRecord]) -> tuple[Axis, Axis]:
    """The latency and size axes; per generated token for a causal LM's trials."""
    fp32 = next((r for r in completed if r.reference == "fp32"), None)
    generation = any("ttft_ms" in r.metrics for r in completed)
    latency = "latency (ms per generated token, median)" if generation else "latency (ms per batch, median)"
    return (Axis("latency_ms", latency, float(fp32.metrics["latency_ms"]) if fp32 else None),
            Axis("size_mb", "size (MB on disk)", float(fp32.metrics["size_mb"]) if fp32 else None))


def _groups(completed: list[TrialRecord], pareto: set[int]) -> dict[str, list[TrialRecord]]:
    searched = [r for r in completed if not r.reference]
    return {
        "Pareto-optimal": [r for r in searched if r.number in pareto and r.recovered_from is None],
        "Pareto-optimal, recovered by distillation": [r for r in searched if r.number in pareto
                                                      and r.recovered_from is not None],
        "dominated": [r for r in searched if r.number not in pareto and r.recovered_from is None],
        "dominated, recovered by distillation": [r for r in searched if r.number not in pareto
                                                 and r.recovered_from is not None],
    }


_GROUP_STYLE = {"Pareto-optimal": ("#d62728", "o"), "Pareto-optimal, recovered by distillation": ("#d62728", "*"),
                "dominated": ("#9e9e9e", "o"), "dominated, recovered by distillation": ("#9e9e9e", "*")}


def write_png(path: Path, completed: list[TrialRecord], pareto: set[int], metric: str,
              not_faster: set[int] = frozenset()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    references = [r for r in completed if r.reference]
    figure, panels = plt.subplots(1, 2, figsize=(14, 5.2))
    for panel, axis in zip(panels, axes_of(completed), strict=True):
        for name, members in _groups(completed, pareto).items():
            if members:
                colour, marker = _GROUP_STYLE[name]
                panel.scatter([r.metrics[axis.key] for r in members], [r.metrics[metric] for r in members], c=colour,
                              marker=marker, s=110 if marker == "*" else 36, label=name, edgecolors="black",
                              linewidths=0.5, zorder=3)
        for i, r in enumerate(references):
            panel.scatter([r.metrics[axis.key]], [r.metrics[metric]], marker=_MARKERS[i % len(_MARKERS)], s=70,
                          c=_REFERENCE_COLOURS[i % len(_REFERENCE_COLOURS)], edgecolors="black",
                          linewidths=1.2 if r.number in pareto else 0.5, label=reference_label(r, pareto), zorder=4)
        slow = [r for r in completed if r.number in not_faster]
        if slow:
            panel.scatter([r.metrics[axis.key] for r in slow], [r.metrics[metric] for r in slow], marker="x",
                          c="black", s=60, label="compressed but not faster than fp32", zorder=5)
        for source, recovered in recovery_arrows(completed):
            panel.annotate("", xy=(recovered.metrics[axis.key], recovered.metrics[metric]),
                           xytext=(source.metrics[axis.key], source.metrics[metric]), zorder=2,
                           arrowprops={"arrowstyle": "->", "color": "#2ca02c", "lw": 1.4})
        panel.set_xlabel(axis.label)
        panel.set_ylabel(f"{metric} (held-out)")
        panel.grid(alpha=0.3)
        if axis.fp32:
            fp32 = axis.fp32
            top = panel.secondary_xaxis("top", functions=(lambda v, f=fp32: v / f, lambda v, f=fp32: v * f))
            top.set_xlabel(f"x fp32 {'latency' if axis.key == 'latency_ms' else 'size'}")
    if recovery_arrows(completed):
        panels[0].plot([], [], color="#2ca02c", label="sampled plan -> distilled (arrow)")
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(0.80, 0.5), fontsize=8, frameon=False)
    goal = "up" if METRIC_GOALS[metric] == "max" else "down"
    figure.suptitle(f"slimtune search: Pareto front ({metric} {goal}, latency and size down)")
    figure.tight_layout(rect=(0, 0, 0.80, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_html(path: Path, completed: list[TrialRecord], pareto: set[int], metric: str,
               not_faster: set[int] = frozenset()) -> None:
    html_figure(completed, pareto, metric, not_faster).write_html(path, include_plotlyjs=True)


def html_figure(completed: list[TrialRecord], pareto: set[int], metric: str, not_faster: set[int] = frozenset()):
    """The plotly figure of ``pareto.html``: latency against ``metric``, marker area ~ size; a switch
    between ms and x fp32 where fp32 was measured."""
    import plotly.graph_objects as go

    latency, size = axes_of(completed)
    largest = max(r.metrics["size_mb"] for r in completed)

    def hover(r: TrialRecord, label: str) -> str:
        relative = (f" (x{r.metrics['latency_ms'] / latency.fp32:.2f} fp32)" if latency.fp32 else "",
                    f" (x{r.metrics['size_mb'] / size.fp32:.2f} fp32)" if size.fp32 else "")
        return (f"{label}{' (compressed but not faster than fp32)' if r.number in not_faster else ''}"
                f"<br>{metric} {r.metrics[metric]:.4f}<br>latency {r.metrics['latency_ms']:.2f} ms{relative[0]}"
                f"<br>size {r.metrics['size_mb']:.1f} MB{relative[1]}<br>"
                + "<br>".join(f"{k} = {v}" for k, v in r.params.items()))

    traces: list[tuple[list[TrialRecord], dict]] = []
    for name, members in _groups(completed, pareto).items():
        colour, marker = _GROUP_STYLE[name]
        traces.append((members, {"name": name, "symbol": "star" if marker == "*" else "circle", "color": colour}))
    for i, r in enumerate(r for r in completed if r.reference):
        traces.append(([r], {"name": reference_label(r, pareto), "symbol": _PLOTLY_MARKERS[i % len(_PLOTLY_MARKERS)],
                             "color": _REFERENCE_COLOURS[i % len(_REFERENCE_COLOURS)]}))
    fig = go.Figure()
    for members, style in traces:
        if members:
            fig.add_trace(go.Scatter(
                x=[r.metrics["latency_ms"] for r in members], y=[r.metrics[metric] for r in members], mode="markers",
                name=style["name"], text=[hover(r, r.label) for r in members], hoverinfo="text",
                marker={"size": [10 + 30 * r.metrics["size_mb"] / largest for r in members], "color": style["color"],
                        "symbol": style["symbol"], "line": {"width": 1, "color": "black"}}))
    slow = [r for r in completed if r.number in not_faster]
    if slow:
        fig.add_trace(go.Scatter(x=[r.metrics["latency_ms"] for r in slow], y=[r.metrics[metric] for r in slow],
                                 mode="markers", name="compressed but not faster than fp32", hoverinfo="skip",
                                 marker={"symbol": "x-thin-open", "size": 14, "color": "black"}))

    def arrows(scale: float) -> list[dict]:
        return [{"x": rec.metrics["latency_ms"] / scale, "y": rec.metrics[metric], "ax": src.metrics["latency_ms"] / scale,
                 "ay": src.metrics[metric], "xref": "x", "yref": "y", "axref": "x", "ayref": "y", "showarrow": True,
                 "arrowhead": 2, "arrowcolor": "#2ca02c", "text": ""} for src, rec in recovery_arrows(completed)]

    fig.update_layout(title=f"slimtune search: {metric} vs latency (marker area ~ size; arrows: sampled plan -> "
                            "distilled)", xaxis_title=latency.label, yaxis_title=f"{metric} (held-out)",
                      template="plotly_white", annotations=arrows(1.0))
    if latency.fp32:
        absolute = [list(trace.x) for trace in fig.data]
        relative = [[x / latency.fp32 for x in xs] for xs in absolute]
        fig.update_layout(updatemenus=[{"type": "buttons", "direction": "right", "x": 0, "y": 1.12, "buttons": [
            {"label": "ms", "method": "update",
             "args": [{"x": absolute}, {"xaxis.title.text": latency.label, "annotations": arrows(1.0)}]},
            {"label": "x fp32", "method": "update",
             "args": [{"x": relative}, {"xaxis.title.text": "latency (x fp32)", "annotations": arrows(latency.fp32)}]},
        ]}])
    return fig
