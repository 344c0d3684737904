"""What the Circuits page says about a circuit besides its graph: where circuit files are looked
for, the metrics with readable names, the task's prompts, and one node's edges. No Streamlit
here, so each piece is tested directly."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import pandas as pd

from circuits.graph import Circuit

SUFFIX = ".circuit.json"
METRIC_NAMES = {
    "roc_auc": "ROC AUC of edge scores vs the planted circuit",
    "head_roc_auc": "ROC AUC of head scores vs the planted circuit",
    "edges_kept": "edges kept",
    "edges": "edges in the graph",
    "model": "model",
    "ablation": "ablation of the removed edges",
    "seconds": "discovery time (s)",
    "hooks": "hooks",
    "faithfulness_target": "faithfulness the circuit's size was chosen to reach",
}
"""Readable names of the metrics `workbench circuits` writes; faithfulness and error effects are
named per entry (`faithfulness (resample ablation)`, `error-term effect at HOOK`)."""


def search_folders(entries: Iterable[str], stores: Iterable[str], default_runs: str = "runs") -> list[Path]:
    """Where circuit files are looked for, in order, without repeats: each entry (a circuit file
    or a folder: `--circuits`, ./runs as `workbench explore` passes them, the store roots), the
    folder of each store, the nearest `runs` folder above each store (where `workbench
    circuits` writes when run beside it), and `default_runs` (relative to the current folder)."""
    found: dict[str, Path] = {}

    def keep(path: Path) -> None:
        if path.exists():
            found.setdefault(os.path.realpath(path), path)

    for entry in map(Path, entries):
        keep(entry)
    for store in map(Path, stores):
        keep(store.parent)
        runs = next((p for p in store.parents if p.name == "runs"), None)
        if runs is not None:
            keep(runs)
    keep(Path(default_runs))
    return list(found.values())


def find_circuit_files(places: Iterable[Path]) -> list[str]:
    """Every *.circuit.json among `places` (other files are skipped: a store given as a root) or
    under them (folders, recursively), as
    absolute paths, each once, in the order found (each folder's files sorted)."""
    files: dict[str, None] = {}
    for place in places:
        if place.is_file():
            if place.name.endswith(SUFFIX):
                files[str(place.absolute())] = None
        elif place.is_dir():
            for path in sorted(place.rglob("*" + SUFFIX)):
                files.setdefault(str(path.absolute()), None)
    return list(files)


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return "n/a" if math.isnan(value) else f"{value:.4g}"


def metrics_table(circuit: Circuit) -> pd.DataFrame:
    """(metric, value) rows with readable names and values as text; edges kept / in the graph
    and nodes in the circuit are counted from the graph when the file does not record them."""
    rows = []
    metrics = dict(circuit.metrics)
    for key, name in (
        ("faithfulness", "faithfulness ({} ablation)"),
        ("error_effects", "error-term effect at {}"),
    ):
        if isinstance(metrics.get(key), dict):
            rows += [(name.format(k), _number(v)) for k, v in metrics.pop(key).items()]
    curve = metrics.pop("faithfulness_curve", None)
    if isinstance(curve, list):
        rows.append(("circuit sizes tried (see the curve)", _number(len(curve))))
    if not head_level(circuit):  # a head-level file's edges only draw the circuit's order
        metrics.setdefault("edges_kept", sum(e.in_circuit for e in circuit.edges))
        metrics.setdefault("edges", len(circuit.edges))
    for key, value in metrics.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {_number(v)}" for k, v in value.items())
        rows.append((METRIC_NAMES.get(key, key.replace("_", " ")), _number(value)))
    rows.append(("nodes in the circuit", _number(sum(n.in_circuit for n in circuit.nodes))))
    return pd.DataFrame(rows, columns=["metric", "value"])


def head_level(circuit: Circuit) -> bool:
    """Whether the circuit was found at head level (`circuits.heads`: its units are heads and
    MLPs, and its edges are a drawing of their order, not measured)."""
    return circuit.metrics.get("level") == "head"


def size_unit(circuit: Circuit) -> str:
    """What the size search counts: "nodes" at head level, else "edges"."""
    return "nodes" if head_level(circuit) else "edges"


def faithfulness_curve(circuit: Circuit) -> pd.DataFrame | None:
    """The size search's (units kept, faithfulness) points, by size, the unit `size_unit`'s; None
    when the file records none (a fixed --edges size, older files) or they are malformed."""
    curve = circuit.metrics.get("faithfulness_curve")
    if not isinstance(curve, list) or not curve:
        return None
    try:
        rows = sorted((int(k), float(f)) for k, f in curve)
    except (TypeError, ValueError):
        return None
    return pd.DataFrame(rows, columns=[f"{size_unit(circuit)} kept", "faithfulness"])


def curve_figure(circuit: Circuit):
    """A plotly figure of `faithfulness_curve` with the target as a dashed line and the kept size
    marked; None when the file records no curve."""
    import plotly.graph_objects as go

    curve = faithfulness_curve(circuit)
    if curve is None:
        return None
    unit = size_unit(circuit)
    figure = go.Figure(
        go.Scatter(
            x=curve[f"{unit} kept"].tolist(),
            y=curve["faithfulness"].tolist(),
            mode="lines+markers",
            name="tried",
        )
    )
    target = circuit.metrics.get("faithfulness_target")
    if isinstance(target, (int, float)):
        figure.add_hline(y=target, line_dash="dash", annotation_text=f"target {target}")
    if head_level(circuit):
        kept = circuit.metrics.get(
            "nodes_kept", sum(n.in_circuit for n in circuit.nodes if n.kind != "logits")
        )
    else:
        kept = sum(e.in_circuit for e in circuit.edges)
    figure.add_vline(x=kept, line_dash="dot", annotation_text=f"kept {kept}")
    figure.update_layout(
        height=260,
        margin=dict(l=10, r=10, t=30, b=10),
        title=f"faithfulness vs {unit} kept (the size search)",
        xaxis_title=f"{unit} kept",
        yaxis_title="faithfulness",
        showlegend=False,
    )
    return figure


def config_table(circuit: Circuit) -> pd.DataFrame:
    """The `CircuitConfig` that made the circuit as (setting, value) rows (empty when none)."""
    rows = [(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in circuit.config.items()]
    return pd.DataFrame(rows, columns=["setting", "value"])


def prompts_table(circuit: Circuit) -> pd.DataFrame | None:
    """The prompts the file records, clean beside corrupted (None when it records none)."""
    clean, corrupted = circuit.prompts.get("clean") or [], circuit.prompts.get("corrupted") or []
    if not clean and not corrupted:
        return None
    n = max(len(clean), len(corrupted))
    pad = [""] * n
    return pd.DataFrame({"clean": (clean + pad)[:n], "corrupted (patched in)": (corrupted + pad)[:n]})


def prompts_note(circuit: Circuit) -> str:
    """A line on where the prompts come from: how many the file shows of the task's, or, for
    files that record none, what the config says."""
    total = circuit.prompts.get("total")
    shown = len(circuit.prompts.get("clean") or [])
    if shown:
        return f"{shown} of the task's {total or shown} prompts"
    config = circuit.config
    if config:
        return (
            f"this file records no prompts; the task {config.get('task')!r} drew {config.get('prompts')} "
            f"prompts of {config.get('length')} tokens with seed {config.get('seed')}"
        )
    return "this file records neither prompts nor the config that made it"


def node_edges(circuit: Circuit, node_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(incoming, outgoing) edges of a node, strongest |score| first: columns from / to, input
    (q, k, v for heads), score, in circuit."""

    def frame(edges, other: str) -> pd.DataFrame:
        rows = [
            {
                other: getattr(e, "source" if other == "from" else "target"),
                "input": e.input,
                "score": e.score,
                "in circuit": e.in_circuit,
            }
            for e in sorted(edges, key=lambda e: -abs(e.score))
        ]
        return pd.DataFrame(rows, columns=[other, "input", "score", "in circuit"])

    incoming = [e for e in circuit.edges if e.target == node_id]
    outgoing = [e for e in circuit.edges if e.source == node_id]
    return frame(incoming, "from"), frame(outgoing, "to")


def edges_table(edges) -> pd.DataFrame:
    """Edges strongest |score| first: source, target, input, score, in_circuit."""
    frame = pd.DataFrame(
        [e.__dict__ for e in edges], columns=["source", "target", "input", "score", "in_circuit"]
    )
    return frame.reindex(frame.score.abs().sort_values(ascending=False).index).reset_index(drop=True)
