"""ACDC pruning, circuit scoring and the one-call `discover` on a small GPT-2."""

from __future__ import annotations

import json

import pytest
import torch

from circuits.acdc import acdc_mask, acdc_scores
from circuits.attribution import ablated_outputs, task_score
from circuits.discover import METHODS, discover, to_circuit
from circuits.evaluate import faithfulness, faithfulness_all, mask_of_edges, roc_auc, top_edges
from circuits.graph import load_circuit
from circuits.tasks import TaskError
from tests.test_circuits_attribution import graph_model, task  # noqa: F401 - fixtures


def test_acdc_removes_only_edges_that_cost_less_than_tau(graph_model, task):  # noqa: F811
    ablated = ablated_outputs(graph_model, task)
    full = task_score(graph_model, task)
    gap = full - task_score(graph_model, task, graph_model.full_mask(0.0), ablated)
    tau = 0.01 * abs(gap)
    mask = acdc_mask(graph_model, task, ablated, tau)
    removed = int(graph_model.graph.allowed.sum() - mask.sum())
    assert 0 < removed < len(graph_model.graph.edges)
    # each accepted removal cost < tau, so the whole pruning cost < removed * tau
    assert full - task_score(graph_model, task, mask, ablated) < removed * tau
    assert acdc_mask(graph_model, task, ablated, float("inf")).sum() == 0
    assert torch.equal(acdc_mask(graph_model, task, ablated, -float("inf")), graph_model.full_mask())


def test_acdc_sweep_scores_are_the_largest_surviving_threshold(graph_model, task):  # noqa: F811
    ablated = ablated_outputs(graph_model, task)
    sweep = acdc_scores(graph_model, task, ablated, thresholds=[1e-3, 1e-2])
    for index, (s, r) in enumerate(graph_model.graph.edges):
        survives = [tau for tau, mask in sweep.masks.items() if mask[s, r] > 0]
        assert float(sweep.scores[index]) == pytest.approx(max(survives, default=0.0))
        if survives:  # an edge kept at τ cost at least τ when its pass tried it
            assert float(sweep.effects[index]) >= max(survives)


def test_faithfulness_is_one_for_the_model_and_zero_for_nothing(graph_model, task):  # noqa: F811
    everything = torch.ones(len(graph_model.graph.edges), dtype=torch.bool)
    for ablation in ("resample", "mean", "zero"):
        assert faithfulness(
            graph_model, task, mask_of_edges(graph_model, everything), ablation
        ) == pytest.approx(1.0, abs=1e-5)
        assert faithfulness(
            graph_model, task, mask_of_edges(graph_model, ~everything), ablation
        ) == pytest.approx(0.0, abs=1e-5)


def test_roc_auc_and_top_edges():
    assert roc_auc({"a": 0.9, "b": -0.8, "c": 0.1, "d": 0.0}, {"a", "b"}) == 1.0
    assert roc_auc({"a": 0.1, "b": 0.9}, {"a"}) == 0.0
    assert roc_auc([0.3, 0.2], [True, True]) != roc_auc([0.3, 0.2], [True, True])  # undefined: nan
    assert top_edges(torch.tensor([0.1, -3.0, 2.0, 0.0]), 2).tolist() == [False, True, True, False]


@pytest.mark.parametrize("method", METHODS)
def test_discover_gives_a_circuit_that_reads_back(graph_model, task, method, tmp_path):  # noqa: F811
    found = discover(graph_model, task, method, steps=2, n_edges=12)
    assert found.scores.shape == (len(graph_model.graph.edges),) and found.kept.any()
    if method != "codes":  # a head-level method keeps no edge it scores 0
        assert int(found.kept.sum()) == 12
    assert int(found.kept.sum()) <= 12 and found.curve == []  # a fixed size: no size search
    scores = faithfulness_all(graph_model, task, found.mask(graph_model))
    assert set(scores) == {"resample", "mean", "zero"}
    circuit = to_circuit(graph_model, task, found, metrics={"faithfulness": scores})
    circuit.save(tmp_path / "c.circuit.json")
    again = load_circuit(tmp_path / "c.circuit.json")
    assert again.to_json() == json.loads(json.dumps(circuit.to_json()))  # the file round-trips exactly
    assert len(again.edges) == len(graph_model.graph.edges) and sum(e.in_circuit for e in again.edges) == int(
        found.kept.sum()
    )
    assert {e.input for e in again.edges} == {"q", "k", "v", ""}


def test_unknown_method_and_ablation_are_refused(graph_model, task):  # noqa: F811
    with pytest.raises(TaskError, match="unknown method"):
        discover(graph_model, task, "magic")
    with pytest.raises(TaskError, match="unknown ablation"):
        discover(graph_model, task, "eap", ablation="blur")


def test_cli_circuits_writes_a_circuit_the_explorer_reads(capsys, tiny_model_dir, tmp_path):
    from tests.test_cli import run_cli

    out = tmp_path / "tiny.circuit.json"
    code, stdout, err = run_cli(
        capsys,
        "circuits",
        "--model",
        str(tiny_model_dir),
        "--method",
        "eap",
        "--prompts",
        "8",
        "--length",
        "17",
        "--edges",
        "10",
        "--out",
        str(out),
        "--json",
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["edges_kept"] == 10 and set(summary["faithfulness"]) == {"resample", "mean", "zero"}
    circuit = load_circuit(out)
    assert circuit.method == "eap" and sum(e.in_circuit for e in circuit.edges) == 10
    code, _, err = run_cli(
        capsys, "circuits", "--model", str(tiny_model_dir), "--method", "magic", "--out", str(out)
    )
    assert code == 2 and "unknown method" in err


def test_a_circuit_json_records_its_config_and_reruns_to_the_same_scores(capsys, tmp_path):
    from tests.test_cli import run_cli

    first, second = tmp_path / "first.circuit.json", tmp_path / "second.circuit.json"
    flags = [
        "--task",
        "or-gate",
        "--prompts",
        "8",
        "--length",
        "9",
        "--seed",
        "3",
        "--steps",
        "3",
        "--ablation",
        "mean",
        "--edges",
        "6",
    ]
    code, _, err = run_cli(capsys, "circuits", *flags, "--out", str(first), "--json")
    assert code == 0, err
    saved = json.loads(first.read_text())
    assert saved["config"] == {
        "model": "",
        "task": "or-gate",
        "dictionary": [],
        "features_per_hook": 10,
        "method": "eap-ig",
        "ablation": "mean",
        "prompts": 8,
        "length": 9,
        "steps": 3,
        "edges": 6,
        "faithfulness": 0.8,
        "seed": 3,
        "device": "auto",
        "model_dtype": "float32",
    }
    code, _, err = run_cli(capsys, "circuits", "--config", str(first), "--out", str(second), "--json")
    assert code == 0, err
    again = json.loads(second.read_text())
    assert again["config"] == saved["config"]
    assert again["edges"] == saved["edges"] and again["nodes"] == saved["nodes"]
    assert again["metrics"]["faithfulness"] == saved["metrics"]["faithfulness"]
    # flags still override the file: another seed draws other prompts
    code, _, err = run_cli(capsys, "circuits", "--config", str(first), "--seed", "4", "--out", str(second))
    assert code == 0, err
    other = json.loads(second.read_text())
    assert other["config"]["seed"] == 4 and other["edges"] != saved["edges"]


def test_a_circuit_of_a_task_file_reruns_from_another_folder(capsys, tiny_model_dir, tmp_path, monkeypatch):
    from tests.test_cli import run_cli

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    clean = torch.randint(0, 512, (4, 6), generator=torch.Generator().manual_seed(0))
    spec = {
        "name": "toy",
        "clean": clean.tolist(),
        "corrupted": clean.flip(0).tolist(),
        "metric": "logprob",
        "answers": clean[:, 0].tolist(),
    }
    (work / "toy.json").write_text(json.dumps(spec))
    monkeypatch.chdir(work)
    code, _, err = run_cli(
        capsys,
        "circuits",
        "--model",
        str(tiny_model_dir),
        "--task",
        "toy.json",
        "--method",
        "eap",
        "--out",
        "toy.circuit.json",
        "--json",
    )
    assert code == 0, err
    saved = json.loads((work / "toy.circuit.json").read_text())
    assert saved["config"]["task"] == str(work / "toy.json")  # absolute: it reruns from anywhere
    assert saved["config"]["model"] == str(tiny_model_dir)
    monkeypatch.chdir(elsewhere)
    code, _, err = run_cli(
        capsys, "circuits", "--config", str(work / "toy.circuit.json"), "--out", "again.json"
    )
    assert code == 0, err
    assert json.loads((elsewhere / "again.json").read_text())["edges"] == saved["edges"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "eap,magic"], "unknown method 'magic'"),
        (["--ablation", "blur"], "unknown ablation 'blur'"),
        (["--prompts", "0"], "prompts must be positive, got 0"),
        (["--steps", "-3"], "steps must be positive, got -3"),
        (["--edges", "-1"], "edges must be >= 0, got -1"),
        (["--method", "eap,acdc"], "one method per circuit"),
    ],
)
def test_bad_circuit_flags_are_one_line_errors(capsys, tmp_path, flags, message):
    from tests.test_cli import run_cli

    code, _, err = run_cli(capsys, "circuits", "--task", "or-gate", *flags, "--out", str(tmp_path / "c.json"))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.json").exists()


def test_an_induction_task_too_short_for_two_copies_is_a_config_error():
    """--length 2..8 reached torch.randint as 'from=4 >= to=1' (a traceback, exit 1)."""
    from circuits.tasks import TaskError, induction_task

    with pytest.raises(TaskError, match="length >= 9"):
        induction_task(vocab=50, n=4, length=8)
    assert induction_task(vocab=50, n=4, length=9).clean.shape == (4, 9)
