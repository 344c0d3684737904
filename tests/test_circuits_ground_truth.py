"""The hand-set ground-truth models, every method scored on them, the benchmark and user task files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from circuits.attribution import ablated_outputs, task_score
from circuits.benchmark import run_benchmark
from circuits.catalog import load_task
from circuits.discover import METHODS, discover
from circuits.evaluate import faithfulness, mask_of_edges
from circuits.gates import FALSE_TOKEN, TRUE_TOKEN, gate_model
from circuits.induction import induction_model, planted_induction_task
from circuits.tasks import TaskError


@pytest.mark.parametrize("gate, truth", [("or", lambda a, b: a or b), ("and", lambda a, b: a and b)])
def test_gate_models_compute_their_gate(gate, truth):
    model = gate_model(gate).requires_grad_(False)
    for a in (0, 1):
        for b in (0, 1):
            logits = model(torch.tensor([[0, 1 + a, 1 + b]]))[0, -1]
            says_true = bool(logits[TRUE_TOKEN] > logits[FALSE_TOKEN])
            assert says_true == bool(truth(a, b)), (gate, a, b)
            assert abs(float(logits[TRUE_TOKEN] - logits[FALSE_TOKEN])) > 3  # decisive, not a near tie


def test_induction_model_predicts_the_repeated_half_only():
    model, task = induction_model(), planted_induction_task(n=32)
    logits = model(task.clean)
    assert task.score(logits) > -1.0  # mean log-prob of the right token inside the second copy
    ablated = ablated_outputs(model, task)
    assert (
        task_score(model, task, model.full_mask(0.0), ablated) < -5.0
    )  # without its edges: worse than chance-ish
    truth = torch.tensor([name in set(task.ground_truth["edges"]) for name in model.graph.edge_names])
    assert faithfulness(model, task, mask_of_edges(model, truth), "resample") == pytest.approx(1.0, abs=0.02)
    # the planted circuit needs every one of its edges: dropping any one loses most of the effect
    for index in torch.nonzero(truth).flatten().tolist():
        fewer = truth.clone()
        fewer[index] = False
        assert faithfulness(model, task, mask_of_edges(model, fewer), "resample") < 0.5, (
            model.graph.edge_names[index]
        )


@pytest.fixture(scope="module")
def benchmark_rows():
    planted = ["planted-induction", "or-gate", "and-gate", "or-gate-saturated"]
    return {(row["task"], row["method"]): row for row in run_benchmark(planted, prompts=32)}


PATCHING_AND_GRADIENTS = [m for m in METHODS if m != "codes"]


@pytest.mark.parametrize("task", ["planted-induction", "or-gate", "and-gate"])
@pytest.mark.parametrize("method", PATCHING_AND_GRADIENTS)
def test_every_method_recovers_the_planted_circuits(benchmark_rows, task, method):
    row = benchmark_rows[(task, method)]
    first_order_miss = method == "eap" and task == "planted-induction"  # EAP ranks a distractor's edges high
    assert row["head_roc_auc"] >= 0.95 and row["roc_auc"] >= (0.85 if first_order_miss else 0.95)
    if not first_order_miss:
        assert row["faithfulness"]["resample"] == pytest.approx(1.0, abs=0.05)
    assert row["spearman_vs_exact"] >= 0.85 or method == "acdc"  # ACDC's scores are coarse thresholds


def test_eap_ig_tracks_exact_patching_on_the_induction_model(benchmark_rows):
    assert benchmark_rows[("planted-induction", "eap-ig")]["spearman_vs_exact"] >= 0.9
    assert (
        benchmark_rows[("planted-induction", "eap")]["faithfulness"]["resample"] < 0.5
    )  # the linear approximation's miss


def test_the_saturated_or_gate_fools_one_edge_at_a_time_methods(benchmark_rows):
    """With a = b = 1 each input alone is redundant: exact single-edge patching and EAP see the
    inputs as inert; EAP-IG, integrating from (0, 0), finds them."""
    rows = {method: benchmark_rows[("or-gate-saturated", method)] for method in PATCHING_AND_GRADIENTS}
    assert rows["exact"]["roc_auc"] < 0.8 and rows["eap"]["roc_auc"] < 0.8
    assert rows["eap-ig"]["roc_auc"] == pytest.approx(1.0)


def test_benchmark_rows_name_what_the_issue_asks(benchmark_rows):
    for row in benchmark_rows.values():
        assert {"task", "method", "roc_auc", "faithfulness", "spearman_vs_exact", "seconds"} <= set(row)
        assert set(row["faithfulness"]) == {"resample", "mean", "zero"}


def test_cli_benchmark_prints_one_json_object_per_task_and_method(capsys):
    from tests.test_cli import run_cli

    code, stdout, err = run_cli(
        capsys, "circuits", "--benchmark", "or-gate", "--method", "eap,eap-ig", "--json"
    )
    assert code == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [(r["task"], r["method"]) for r in rows] == [("or-gate", "eap"), ("or-gate", "eap-ig")]
    assert all(r["spearman_vs_exact"] > 0.9 for r in rows)  # exact patching ran as the reference
    code, stdout, err = run_cli(capsys, "circuits", "--benchmark", "or-gate", "--method", "codes", "--json")
    row = json.loads(stdout)  # strict JSON: the undefined Spearman of a constant ranking is null, not NaN
    assert code == 0 and row["spearman_vs_exact"] is None and "NaN" not in stdout
    code, _, err = run_cli(capsys, "circuits", "--benchmark", "docstring")
    assert code == 2 and "unknown benchmark task" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "circuits", "--task", "or-gate", "--model", "demo")
    assert code == 2 and "built-in model" in err


def test_a_user_task_file_runs_end_to_end(capsys, tiny_model_dir, tiny_model, tmp_path):
    from tests.test_cli import run_cli

    clean = tiny_model.tokenize(["ROMEO: But soft, what light", "JULIET: O Romeo, Romeo, where"])
    corrupted = tiny_model.tokenize(["KING: Once more unto the", "QUEEN: Now is the winter of"])
    width = min(clean.shape[1], corrupted.shape[1])
    spec = {
        "name": "toy",
        "clean": clean[:, :width].tolist(),
        "corrupted": corrupted[:, :width].tolist(),
        "metric": "logit_diff",
        "answers": [5, 6],
        "wrong": [7, 8],
    }
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(spec))
    graph, task = load_task(str(path), str(tiny_model_dir))
    logits = graph(task.clean)
    expected = logits[:, -1, [5, 6]].diagonal() - logits[:, -1, [7, 8]].diagonal()
    assert torch.allclose(task.metric(logits, slice(None)), expected)
    code, stdout, err = run_cli(
        capsys,
        "circuits",
        "--model",
        str(tiny_model_dir),
        "--task",
        str(path),
        "--method",
        "eap",
        "--out",
        str(tmp_path / "toy.circuit.json"),
        "--json",
    )
    assert code == 0, err and json.loads(stdout)["method"] == "eap"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"clean": []}, "non-empty list"),
        ({"corrupted": [[1, 2]]}, "differ in shape"),
        ({"clean": [[1, 2, 3], [1, 2]]}, "different lengths"),
        ({"clean": [[1, -2, 3], [1, 2, 3]]}, "all texts or all lists"),
        ({"metric": "accuracy"}, "unknown metric"),
        ({"answers": [1]}, "one answer per prompt"),
        ({"answers": [1, 10**9]}, "not a single token"),
        ({"answers": ["a whole phrase of text", " x"]}, "not a single token"),
    ],
)
def test_bad_task_files_are_one_line_errors(tiny_model_dir, tmp_path, change, message):
    spec = {
        "clean": [[1, 2, 3], [4, 5, 6]],
        "corrupted": [[7, 8, 9], [9, 8, 7]],
        "metric": "logit_diff",
        "answers": [1, 2],
        "wrong": [3, 4],
        **change,
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(TaskError, match=message) as caught:
        load_task(str(path), str(tiny_model_dir))
    assert "\n" not in str(caught.value)


def test_corrupt_task_file_and_unknown_task_are_refused(tiny_model_dir, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(TaskError, match="broken.json"):
        load_task(str(path), str(tiny_model_dir))
    with pytest.raises(TaskError, match="unknown task"):
        load_task("docstring")


def test_discrete_codes_in_the_benchmark(benchmark_rows):
    """On induction the induction head ranks first and the previous-token head ties with the
    distractors (head AUC 0.75); on the gates every clean code also occurs in the corrupted set
    (random bits cover all inputs), so the method sees nothing (tests/test_circuits_codes.py)."""
    assert benchmark_rows[("planted-induction", "codes")]["head_roc_auc"] >= 0.75
    assert benchmark_rows[("or-gate", "codes")]["edges_kept"] == 0


def test_ground_truth_wiring_follows_the_head_roles():
    from circuits.trained_induction import ground_truth

    textbook = {
        "a0.0": ("offset", 1, 0.9),
        "a0.1": ("other", 0, 0.1),
        "a1.0": ("induction", 1, 0.8),
        "a1.1": ("other", 0, 0.2),
    }
    assert ground_truth(textbook) == {
        "heads": ["a0.0", "a1.0"],
        "edges": sorted(["a0.0->a1.0.k", "embed->a1.0.v", "embed->a1.0.q", "a1.0->logits", "embed->a0.0.v"]),
    }
    shifted = {
        "a0.0": ("offset", 4, 0.9),
        "a0.1": ("offset", 3, 0.8),
        "a0.2": ("offset", 6, 0.8),
        "a1.0": ("induction", 4, 0.8),
    }
    truth = ground_truth(shifted)
    assert truth["heads"] == ["a0.0", "a0.1", "a1.0"]  # the offset-6 head feeds no induction head
    assert {"a0.0->a1.0.k", "a0.1->a1.0.v"} <= set(truth["edges"]) and "embed->a1.0.v" not in truth["edges"]
    orphan = {"a0.0": ("offset", 2, 0.9), "a1.0": ("induction", 1, 0.9)}  # no offset-1 head for its key
    assert ground_truth(orphan) == {"heads": [], "edges": []}


def test_a_recipe_saved_before_batch_size_was_renamed_still_loads_its_model(tmp_path, monkeypatch):
    """recipe.json files written before issue 18 say "batch"; the model saved with one is loaded,
    not retrained, and a recipe that differs in another field still retrains."""
    from safetensors.torch import save_file

    from circuits import trained_induction
    from circuits.trained_induction import InductionRecipe, load_or_train
    from circuits.transformer import GraphTransformer

    recipe = InductionRecipe(d_model=16, n_heads=2, vocab=32, length=9, steps=1)
    saved = GraphTransformer(recipe.shape())
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(tmp_path / "model.safetensors"))
    old = {("batch" if k == "batch_size" else k): v for k, v in recipe.__dict__.items()}
    (tmp_path / "recipe.json").write_text(json.dumps(old))

    def trains_again(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(trained_induction, "train_induction_model", trains_again)
    loaded = load_or_train(tmp_path, recipe, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), saved.state_dict().values()))
    with pytest.raises(AssertionError, match="retrained"):
        load_or_train(tmp_path, replace(recipe, batch_size=8), progress=False)


@pytest.mark.slow
def test_the_trained_induction_model_and_its_derived_ground_truth(tmp_path, monkeypatch):
    """The packaged two-layer model (test_trained_induction.py checks that its recipe trains it):
    read its ground truth off its heads, and check that the circuit is faithful and that EAP-IG
    and ACDC find it (the issue's targets)."""
    from circuits import trained_induction
    from circuits.benchmark import score_discovery
    from circuits.trained_induction import InductionRecipe, load_or_train, trained_induction_task

    def trains_again(*args, **kwargs):
        raise AssertionError("the packaged model for this recipe should be loaded, not retrained")

    monkeypatch.setattr(trained_induction, "train_induction_model", trains_again)
    model = load_or_train(tmp_path / "model", InductionRecipe(), progress=False)
    task = trained_induction_task(model, n=48)
    assert task.score(model(task.clean)) > -0.5  # it does induction (uniform guessing: -5.5)
    truth = task.ground_truth
    assert any(h.startswith("a0.") for h in truth["heads"]) and any(
        h.startswith("a1.") for h in truth["heads"]
    )
    kept = torch.tensor([name in set(truth["edges"]) for name in model.graph.edge_names])
    assert faithfulness(model, task, mask_of_edges(model, kept), "resample") > 0.9
    exact = discover(model, task, "exact", n_edges=len(truth["edges"]))
    for method in ("eap-ig", "acdc"):
        row = score_discovery(model, task, discover(model, task, method, n_edges=len(truth["edges"])), exact)
        assert row["roc_auc"] >= 0.95, row
        assert row["faithfulness"]["resample"] > 0.9, row
