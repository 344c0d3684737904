"""The circuit file format: a JSON graph that the circuits engine writes and the explorer draws.

    {"format_version": 1, "task": "induction", "method": "eap-ig", "metrics": {...}, "config": {...},
     "nodes": [{"id": "a1.3", "kind": "head", "layer": 1, "label": "L1H3", "score": 0.8,
                "in_circuit": true, "hook": "...", "feature": null, "store": null}, ...],
     "edges": [{"source": "a0.2", "target": "a1.3", "score": 0.5, "in_circuit": true,
                "input": "k"}, ...]}

`config` (written by `workbench circuits`, absent from circuits built in code) is the
`CircuitConfig` that made the circuit, so `workbench circuits --config FILE` reruns it.
`prompts` (optional; absent from older files): some of the task's prompts as shown to a reader,
`{"clean": [str, ...], "corrupted": [str, ...], "total": N}` (N: the task's prompt count).
`kind` is one of embed, head, mlp, feature, error, logits; feature nodes name their latent
(`feature`) and may name the feature store that describes it (`store`): `workbench circuits`
writes it absolute; a relative one (older files) is read against the JSON's folder, else the
current one, wherever a store is found. Never pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.files import write_json_atomic

FORMAT_VERSION = 1
NODE_KINDS = ("embed", "head", "mlp", "feature", "error", "logits")


class CircuitError(WorkbenchError, ValueError):
    """A circuit file that cannot be read."""


@dataclass
class Node:
    id: str
    kind: str
    layer: int
    label: str = ""
    score: float = 0.0
    in_circuit: bool = True
    hook: str | None = None
    feature: int | None = None
    store: str | None = None


@dataclass
class Edge:
    source: str
    target: str
    score: float = 0.0
    in_circuit: bool = True
    input: str = ""
    """Which input of the target: q, k or v for heads; empty otherwise."""


@dataclass
class Circuit:
    nodes: list[Node]
    edges: list[Edge]
    task: str = ""
    method: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    """What made the circuit (a `CircuitConfig` as JSON); empty for circuits built in code, and then
    not written, so `--config` never reruns a file that records nothing as the defaults."""
    prompts: dict[str, Any] = field(default_factory=dict)
    """Some of the task's prompts: {"clean": [str], "corrupted": [str], "total": int}; may be empty."""

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "method": self.method,
            "metrics": self.metrics,
            **({"config": self.config} if self.config else {}),
            **({"prompts": self.prompts} if self.prompts else {}),
            "nodes": [asdict(n) for n in self.nodes],
            "edges": [asdict(e) for e in self.edges],
        }

    def save(self, path: str | os.PathLike) -> Path:
        write_json_atomic(path, self.to_json())
        return Path(path)

    @classmethod
    def from_json(cls, obj: object, where: str = "circuit") -> "Circuit":
        if not isinstance(obj, dict):
            raise CircuitError(f"{where}: expected a JSON object")
        if obj.get("format_version") != FORMAT_VERSION:
            raise CircuitError(
                f"{where}: unknown format_version {obj.get('format_version')!r} "
                f"(this workbench reads {FORMAT_VERSION})"
            )
        nodes = [_build(Node, n, f"{where}: node {i}") for i, n in enumerate(_list(obj, "nodes", where))]
        ids = {n.id for n in nodes}
        if len(ids) != len(nodes):
            raise CircuitError(f"{where}: duplicate node ids")
        for node in nodes:
            if node.kind not in NODE_KINDS:
                raise CircuitError(
                    f"{where}: node {node.id!r} has unknown kind {node.kind!r} "
                    f"(one of {', '.join(NODE_KINDS)})"
                )
        edges = [_build(Edge, e, f"{where}: edge {i}") for i, e in enumerate(_list(obj, "edges", where))]
        for edge in edges:
            if edge.source not in ids or edge.target not in ids:
                raise CircuitError(f"{where}: edge {edge.source!r} -> {edge.target!r} names an unknown node")
        metrics = obj.get("metrics", {})
        config = obj.get("config", {})
        prompts = obj.get("prompts", {})
        if not isinstance(metrics, dict) or not isinstance(config, dict) or not isinstance(prompts, dict):
            raise CircuitError(f"{where}: metrics, config and prompts must be objects")
        for key in ("clean", "corrupted"):
            texts = prompts.get(key, [])
            if not isinstance(texts, list) or not all(isinstance(p, str) for p in texts):
                raise CircuitError(f"{where}: prompts[{key!r}] must be a list of strings")
        return cls(
            nodes, edges, str(obj.get("task", "")), str(obj.get("method", "")), metrics, config, prompts
        )


def load_circuit(path: str | os.PathLike) -> Circuit:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CircuitError(f"{path}: no such circuit file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CircuitError(f"{path}: not a readable circuit JSON ({exc})") from None
    circuit = Circuit.from_json(obj, str(path))
    for node in circuit.nodes:
        if node.store and not Path(node.store).is_absolute():  # files written before paths were absolute
            node.store = _resolved_store(node.store, Path(path).absolute().parent)
    return circuit


def _resolved_store(store: str, folder: Path) -> str:
    """A relative store path: against the circuit JSON's `folder` when a store is there, else
    against the current folder when one is there (where `workbench circuits` ran), else as written."""
    for candidate in (folder / store, Path(store).absolute()):
        if candidate.exists():
            return str(candidate)
    return store


def _list(obj: dict, key: str, where: str) -> list:
    value = obj.get(key)
    if not isinstance(value, list):
        raise CircuitError(f"{where}: {key!r} must be a list")
    return value


def _build(cls, item: object, where: str):
    if not isinstance(item, dict):
        raise CircuitError(f"{where}: expected an object")
    names = {f for f in cls.__dataclass_fields__}
    unknown = set(item) - names
    if unknown:
        raise CircuitError(f"{where}: unknown fields {sorted(unknown)}")
    try:
        built = cls(**item)
    except TypeError as exc:
        raise CircuitError(f"{where}: {exc}") from None
    for name, kind in (("id", str), ("source", str), ("target", str), ("kind", str)):
        if hasattr(built, name) and not isinstance(getattr(built, name), kind):
            raise CircuitError(f"{where}: {name} must be a string")
    for name in ("score", "layer"):
        value = getattr(built, name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CircuitError(f"{where}: {name} must be a number")
    return built
