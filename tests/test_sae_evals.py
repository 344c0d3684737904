"""Evals against exact references: a dictionary that reconstructs perfectly scores 1 (CE and
KL), one that outputs zeros scores exactly as zero-ablation does, and the clean CE is the
model's own loss on the same windows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae.base import create
from sae.config import DictionaryConfig
from sae.evals import EvalConfig, evaluate
from sae.splicing import splice

HOOK = "blocks.0.hook_resid_post"


def relu_dictionary(tiny_model_dir, d: int, exact: bool):
    """Latents [relu(x), relu(-x)] decoded by [I; -I] give x back exactly; a zero decoder gives 0."""
    dictionary = create(DictionaryConfig(architecture="relu", d_in=d, n_latents=2 * d, k=1))
    eye = torch.eye(d)
    with torch.no_grad():
        dictionary.W_enc.copy_(torch.cat([eye, -eye]))
        dictionary.b_enc.zero_()
        dictionary.b_dec.zero_()
        dictionary.W_dec.copy_(torch.cat([eye, -eye]) if exact else torch.zeros(2 * d, d))
    dictionary.meta = {
        "hook": HOOK,
        "model": str(tiny_model_dir),
        "corpus": "tiny-shakespeare",
        "context_length": 32,
    }
    return dictionary


@pytest.fixture(scope="module")
def evals(tiny_model, tiny_model_dir):
    d = tiny_model.width(HOOK)
    config = EvalConfig(tokens=2048, batch_size=16)
    return {
        exact: evaluate(relu_dictionary(tiny_model_dir, d, exact), config, model=tiny_model, progress=False)
        for exact in (True, False)
    }


def test_a_perfect_reconstruction_scores_one(evals):
    m = evals[True]
    assert m["fvu"] < 1e-10 and m["explained_variance"] > 1 - 1e-10
    assert m["ce_sae"] == pytest.approx(m["ce_clean"], abs=1e-5)
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4) and m["kl_score"] == pytest.approx(
        1.0, abs=1e-4
    )
    assert m["kl_sae"] < 1e-6 and m["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-6)
    assert m["ce_zero_ablation"] > m["ce_clean"] + 0.02  # the baseline is a real gap (tiny model: ~0.07 nats)
    assert m["tokens"] == 64 * 31 and m["dead_fraction"] < 0.5


def test_a_zero_reconstruction_scores_as_zero_ablation(evals):
    m = evals[False]
    assert m["fvu"] > 0.5
    assert m["ce_sae"] == pytest.approx(m["ce_zero_ablation"], abs=1e-6)
    assert m["ce_loss_score"] == pytest.approx(0.0, abs=1e-6) and m["kl_score"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert 0 < m["ce_loss_score_mean_ablation"] or m["ce_mean_ablation"] < m["ce_zero_ablation"]


def test_clean_loss_is_the_models_own_loss(evals, tiny_model):
    from workbench.activations import CacheConfig, select_windows

    windows = select_windows(
        CacheConfig(
            model="tiny", corpus="tiny-shakespeare", split="validation", tokens=2048, context_length=32
        ),
        tiny_model,
    )
    with torch.no_grad():
        logits = tiny_model(windows)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), windows[:, 1:].reshape(-1))
    assert evals[True]["ce_clean"] == pytest.approx(float(ce), rel=1e-6)


def test_splice_leaves_bos_alone_and_removes_its_hook(tiny_model, tiny_model_dir):
    d = tiny_model.width(HOOK)
    zero = relu_dictionary(tiny_model_dir, d, exact=False)
    tokens = tiny_model.tokenize(["ROMEO: what light"])
    with torch.no_grad():
        clean = tiny_model(tokens)
        with splice(tiny_model, zero):
            patched = tiny_model(tokens)
        after = tiny_model(tokens)
    torch.testing.assert_close(patched[:, 0], clean[:, 0])  # the BOS position is untouched
    assert not torch.allclose(patched[:, 1:], clean[:, 1:])
    torch.testing.assert_close(after, clean)


def test_density_histogram_counts_live_latents(evals):
    histogram = evals[True]["log_density_histogram"]
    assert len(histogram["counts"]) == len(histogram["bin_edges"]) - 1
    live = round((1 - evals[True]["dead_fraction"]) * 2 * 64)
    assert sum(histogram["counts"]) == live


def test_sparse_probing_compares_latents_with_neurons(evals):
    m = evals[True]
    tasks = m["sparse_probing"]["tasks"]
    assert m["sparse_probing"]["k"] == 1 and tasks  # tiny-shakespeare has speakers, lines, words
    assert all(0 <= s["neurons"] <= 1 and 0 <= s["latents"] <= 1 for s in tasks.values())
    assert m["sparse_probing_latents"] == pytest.approx(
        sum(s["latents"] for s in tasks.values()) / len(tasks)
    )
