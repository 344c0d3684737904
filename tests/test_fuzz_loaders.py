"""Fuzzed JSON into the loaders: they accept it or raise the project's own one-line errors."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from workbench.cache_reader import Manifest
from workbench.errors import CacheError, ConfigError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

VALID = {
    "format_version": 1,
    "model": "demo",
    "dtype": "float32",
    "context_length": 4,
    "n_windows": 2,
    "bos_token_id": 0,
    "tokens_sha256": "ab",
    "config": {},
    "hooks": {"h": {"d": 3, "shards": [{"file": "h/shard-00000.safetensors", "rows": 8, "sha256": "cd"}]}},
}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(VALID)), json_values, max_size=9))
def test_manifest_mutations_raise_only_cache_errors(changes):
    try:
        Manifest.parse({**VALID, **changes}, "manifest.json")
    except CacheError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_arbitrary_json_raises_only_cache_errors(value):
    try:
        Manifest.parse(value, "manifest.json")
    except CacheError:
        pass


def test_the_valid_manifest_parses():
    assert Manifest.parse(VALID, "m").hooks["h"][0] == 3


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["model", "hooks", "tokens", "dtype", "seed", "split"]), json_values, max_size=5
    )
)
def test_config_files_raise_only_config_errors(tmp_path_factory, fields):
    import argparse

    from app.flags import config_from_args
    from workbench.activations import CacheConfig

    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps(fields))
    try:
        config_from_args(CacheConfig, argparse.Namespace(config=path))
    except ConfigError as exc:
        assert "\n" not in str(exc)


VALID_CIRCUIT = {
    "format_version": 1,
    "task": "t",
    "method": "eap",
    "metrics": {},
    "nodes": [{"id": "embed", "kind": "embed", "layer": 0}, {"id": "logits", "kind": "logits", "layer": 1}],
    "edges": [{"source": "embed", "target": "logits", "score": 0.5}],
}
node_or_edge_fields = st.dictionaries(
    st.sampled_from(
        [
            "id",
            "kind",
            "layer",
            "label",
            "score",
            "in_circuit",
            "hook",
            "feature",
            "store",
            "source",
            "target",
            "input",
            "extra",
        ]
    ),
    json_values,
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.sampled_from(sorted(VALID_CIRCUIT)), json_values, max_size=6),
    st.lists(node_or_edge_fields, max_size=3),
    st.lists(node_or_edge_fields, max_size=3),
)
def test_circuit_json_mutations_raise_only_circuit_errors(changes, nodes, edges):
    from circuits.graph import Circuit, CircuitError

    obj = {**VALID_CIRCUIT, **changes}
    if nodes:
        obj["nodes"] = [*VALID_CIRCUIT["nodes"], *nodes]
    if edges:
        obj["edges"] = [*VALID_CIRCUIT["edges"], *edges]
    try:
        circuit = Circuit.from_json(obj, "c.json")
    except CircuitError as exc:
        assert "\n" not in str(exc)
        return
    assert Circuit.from_json(json.loads(json.dumps(circuit.to_json()))).to_json() == circuit.to_json()


def test_the_valid_circuit_parses():
    from circuits.graph import Circuit

    assert [n.id for n in Circuit.from_json(VALID_CIRCUIT).nodes] == ["embed", "logits"]
