"""The default circuit size: the smallest prefix of a ranking reaching a faithfulness target
(circuits/search.py), its use by `discover` and `workbench circuits`, and batched ACDC."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from circuits.acdc import _Scores, acdc_mask_unbatched, acdc_pass, acdc_scores
from circuits.attribution import ablated_outputs, task_score
from circuits.config import CircuitConfig
from circuits.discover import _head_circuit, discover
from circuits.evaluate import faithfulness, mask_of_edges, task_scores
from circuits.gates import gate_model, gate_task
from circuits.induction import GROUND_TRUTH, induction_model, planted_induction_task
from circuits.search import smallest_faithful
from workbench.errors import ConfigError


@pytest.fixture(scope="module")
def planted():
    model, task = induction_model(), planted_induction_task(16, 0)
    return model, task, ablated_outputs(model, task)


@pytest.fixture(scope="module")
def gate():
    model, task = gate_model("or"), gate_task("or", 32, 0)
    return model, task, ablated_outputs(model, task)


def _counted(f):
    calls = []

    def wrapped(k):
        calls.append(k)
        return f(k)

    return wrapped, calls


@pytest.mark.parametrize("n", [1, 7, 64, 310])
def test_the_search_finds_the_smallest_size_of_a_monotone_curve_and_keeps_its_curve(n):
    for crossing in sorted({1, 2, 3, n // 3 + 1, n - 1, n} - {0}):

        def curve(k: int, crossing: int = crossing) -> float:
            return 0.9 * min(1.0, k / crossing) ** 2  # reaches 0.8 at 0.943·crossing

        f, calls = _counted(curve)
        found = smallest_faithful(f, n, 0.8)
        brute = next((k for k in range(1, n + 1) if curve(k) >= 0.8), n)
        assert found.k == brute and found.faithfulness == pytest.approx(curve(brute))
        assert len(calls) == len(set(calls)) <= 2 * math.ceil(math.log2(n)) + 1
        xs = [k for k, _ in found.curve]
        assert xs == sorted(set(xs)) and (found.k, found.faithfulness) in found.curve
        assert all(value < 0.8 for k, value in found.curve if k < found.k)
        assert found.k == 1 or (found.k - 1) in xs  # the boundary is checked, not assumed


def test_the_search_on_a_bumpy_curve_keeps_its_guarantee_and_falls_back_to_everything():
    bumpy = {k: v for k, v in enumerate([0, 0.2, 0.85, 0.1, 0.3, 0.5, 0.79, 0.81, 0.7, 0.9, 1.0])}
    found = smallest_faithful(bumpy.__getitem__, 10, 0.8)
    assert bumpy[found.k] >= 0.8 and bumpy[found.k - 1] < 0.8
    assert all(v < 0.8 for k, v in found.curve if k < found.k)
    never = smallest_faithful(lambda k: float("nan") if k < 3 else 0.5, 5, 0.8)
    assert never.k == 5 and never.faithfulness == 0.5 and never.curve[-1] == (5, 0.5)
    assert smallest_faithful(lambda k: 1.0, 0).k == 0


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5, float("nan")])
def test_a_target_outside_zero_to_one_is_a_one_line_config_error(capsys, tmp_path, target):
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        smallest_faithful(lambda k: 1.0, 5, target)
    with pytest.raises(ConfigError, match="faithfulness must be in"):
        CircuitConfig(faithfulness=target)
    from tests.test_cli import run_cli

    out = tmp_path / "c.json"
    code, _, err = run_cli(
        capsys, "circuits", "--task", "or-gate", "--faithfulness", str(target), "--out", str(out)
    )
    assert code == 2 and "faithfulness must be in (0, 1]" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_the_default_planted_induction_circuit_is_the_smallest_faithful_one(planted):
    model, task, ablated = planted
    found = discover(model, task, "eap-ig", steps=2)
    kept = int(found.kept.sum())
    reached = dict(found.curve)[kept]
    assert reached >= 0.8
    assert faithfulness(model, task, found.mask(model), "resample") == pytest.approx(reached, abs=1e-6)
    assert all(value < 0.8 for k, value in found.curve if k < kept) and (kept - 1) in dict(found.curve)
    assert set(found.curve) and kept <= 2 * len(GROUND_TRUTH["edges"])  # about the planted 5, not 5% of 81
    fixed = discover(model, task, "eap-ig", steps=2, n_edges=3)
    assert int(fixed.kept.sum()) == 3 and fixed.curve == []
    assert torch.equal(fixed.kept, found.kept & fixed.kept) or kept < 3  # the 3 best lead the ranking
    assert discover(model, task, "eap-ig", steps=2, faithfulness_target=1.0).kept.sum() >= kept


def test_a_head_level_circuit_grows_by_whole_heads_until_faithful(planted):
    model, task, ablated = planted
    heads = {f"a{layer}.{h}": 0.0 for layer in range(2) for h in range(4)}
    heads.update({"a1.0": 1.0, "a0.0": 0.5, "a1.1": 0.1})
    kept, curve = _head_circuit(model, task, heads, ablated, 0, 0.8)
    named = {model.graph.edge_names[i] for i in torch.nonzero(kept).flatten().tolist()}
    assert set(GROUND_TRUTH["edges"]) <= named and not any("a1.1" in name for name in named)
    assert [size for size, _ in curve] == sorted(size for size, _ in curve)
    assert dict(curve)[int(kept.sum())] >= 0.8 and all(f < 0.8 for size, f in curve if size < int(kept.sum()))


def test_a_batch_of_masks_scores_as_one_mask_at_a_time(planted):
    model, task, ablated = planted
    generator = torch.Generator().manual_seed(0)
    masks = (torch.rand(5, *model.full_mask().shape, generator=generator) > 0.3).float() * model.full_mask()
    batched = task_scores(model, task, masks, ablated, sequences=64)  # 2 masks per forward, then 1
    single = torch.tensor([task_score(model, task, m, ablated) for m in masks], dtype=torch.float64)
    assert torch.allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("where", ["planted", "gate"])
def test_batched_acdc_prunes_exactly_as_the_one_edge_at_a_time_pass(planted, gate, where):
    model, task, ablated = planted if where == "planted" else gate
    gap = task_score(model, task) - task_score(model, task, model.full_mask(0.0), ablated)
    memo = _Scores(model, task, ablated)
    shares = (0.05,) if where == "planted" else (1e-3, 0.05, 0.3, float("inf"), -float("inf"))
    taus = [gap * share for share in shares]  # the planted pass keeps edges mid-window: re-scores
    for tau in taus:
        reference = acdc_mask_unbatched(model, task, ablated, tau)
        for window in (8, 1):  # a batch of masks per forward; one by one from the receiver's layer on
            fast = acdc_pass(model, task, ablated, tau, window=window, scores=memo)
            assert torch.equal(fast.mask, reference.mask), (tau, window)
            assert torch.allclose(fast.drops, reference.drops, atol=1e-5)
            assert fast.forwards <= reference.forwards
        if tau == 0.05 * gap:
            assert 0 < int(model.graph.per_edge(reference.mask).sum()) < len(model.graph.edges)
    alone = acdc_pass(model, task, ablated, taus[0], window=1)  # layer-wise forwards, no memo to lean on
    assert torch.equal(alone.mask, acdc_mask_unbatched(model, task, ablated, taus[0]).mask)


def test_the_unbatched_switch_and_the_default_acdc_circuit(gate, monkeypatch):
    model, task, ablated = gate
    sweep = acdc_scores(model, task, ablated)
    monkeypatch.setenv("WORKBENCH_ACDC_UNBATCHED", "1")
    eager = acdc_scores(model, task, ablated)
    assert os.environ["WORKBENCH_ACDC_UNBATCHED"] == "1" and torch.equal(sweep.scores, eager.scores)
    monkeypatch.delenv("WORKBENCH_ACDC_UNBATCHED")
    found = discover(model, task, "acdc")
    assert faithfulness(model, task, mask_of_edges(model, found.kept), "resample") >= 0.8
    assert found.kept.sum() < len(model.graph.edges) and found.curve


def test_cli_prints_the_chosen_size_and_saves_the_curve(capsys, tmp_path):
    from circuits.graph import load_circuit
    from tests.test_cli import run_cli

    out = tmp_path / "c.json"
    code, stdout, err = run_cli(
        capsys, "circuits", "--task", "or-gate", "--method", "eap", "--out", str(out), "--json"
    )
    assert code == 0, err
    summary = json.loads(stdout)
    curve = load_circuit(out).metrics["faithfulness_curve"]
    assert summary["faithfulness_curve"] == curve and summary["faithfulness_target"] == 0.8
    assert dict(map(tuple, curve))[summary["edges_kept"]] >= 0.8
    from app.explorer.circuit_info import curve_figure, faithfulness_curve, metrics_table

    shown = faithfulness_curve(load_circuit(out))
    assert shown.values.tolist() == [[float(k), f] for k, f in curve] and curve_figure(load_circuit(out))
    assert not metrics_table(load_circuit(out))["value"].str.contains(r"\[").any()  # no raw list
    code, stdout, err = run_cli(
        capsys, "circuits", "--task", "or-gate", "--faithfulness", "0.3", "--out", str(out)
    )
    assert code == 0 and "smallest reaching faithfulness 0.3" in stdout
    code, stdout, err = run_cli(
        capsys, "circuits", "--task", "or-gate", "--edges", "4", "--out", str(out), "--json"
    )
    assert json.loads(stdout)["edges_kept"] == 4 and "faithfulness_curve" not in load_circuit(out).metrics
    assert faithfulness_curve(load_circuit(out)) is None and curve_figure(load_circuit(out)) is None


def test_the_circuits_page_plots_the_size_search(tiny_run, tmp_path, monkeypatch):
    from tests.test_explorer_circuits import circuits_page, layered

    circuit = layered(n_layers=2, heads=2)
    circuit.metrics.update(
        faithfulness_target=0.8, faithfulness_curve=[[1, 0.1], [2, 0.5], [4, 0.9], [3, 0.85]]
    )
    circuit.save(tmp_path / "searched.circuit.json")
    monkeypatch.chdir(tmp_path)
    at = circuits_page(monkeypatch, [str(tiny_run)], circuits=[str(tmp_path)])
    charts = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    assert len(charts) == 2  # the graph first, then the curve
    assert charts[1]["data"][0]["x"] == [1, 2, 3, 4] and charts[1]["data"][0]["y"] == [0.1, 0.5, 0.85, 0.9]
