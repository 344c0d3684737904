"""The circuit graph figure of the Circuits page (plotly)."""

from __future__ import annotations

import plotly.graph_objects as go

from circuits.graph import Circuit


def circuit_figure(circuit: Circuit, only_circuit: bool = False) -> go.Figure:
    """Nodes placed by layer (x) and order within the layer (y); edges as lines whose width
    follows |score|. Each node's id rides in `customdata`, so a click can be resolved."""
    nodes = [n for n in circuit.nodes if n.in_circuit or not only_circuit]
    ids = {n.id for n in nodes}
    edges = [
        e for e in circuit.edges if e.source in ids and e.target in ids and (e.in_circuit or not only_circuit)
    ]
    position, per_layer = {}, {}
    for node in sorted(nodes, key=lambda n: (n.layer, n.kind, n.id)):
        per_layer.setdefault(node.layer, []).append(node.id)
    for layer, ids in per_layer.items():  # each layer's nodes centred on y = 0
        for slot, node_id in enumerate(ids):
            position[node_id] = (layer, slot - (len(ids) - 1) / 2)
    top = max((abs(e.score) for e in edges), default=1.0) or 1.0
    figure = go.Figure()
    for edge in edges:
        (x0, y0), (x1, y1) = position[edge.source], position[edge.target]
        colour = "rgba(40, 120, 200, 0.6)" if edge.score >= 0 else "rgba(200, 60, 60, 0.6)"
        figure.add_trace(
            go.Scatter(
                x=[x0, x1],
                y=[y0, y1],
                mode="lines",
                hoverinfo="skip",
                showlegend=False,
                line=dict(width=0.5 + 5 * abs(edge.score) / top, color=colour),
            )
        )
    figure.add_trace(
        go.Scatter(
            x=[position[n.id][0] for n in nodes],
            y=[position[n.id][1] for n in nodes],
            mode="markers+text",
            text=[n.label or n.id for n in nodes],
            textposition="top center",
            customdata=[n.id for n in nodes],
            marker=dict(
                size=16,
                color=[abs(n.score) for n in nodes],
                colorscale="Oranges",
                line=dict(width=1, color="black"),
                symbol=["diamond" if n.kind == "feature" else "circle" for n in nodes],
            ),
            hovertemplate="%{customdata}<br>score %{marker.color:.3g}<extra></extra>",
            showlegend=False,
            name="nodes",
        )
    )
    figure.update_layout(
        height=520,
        margin=dict(l=20, r=20, t=30, b=30),
        xaxis_title="layer",
        yaxis=dict(showticklabels=False),
        title=f"{circuit.task} · {circuit.method}",
    )
    return figure
