"""Attention-output (hook_z) dictionaries per head (`sae.attention_heads`): the decoder's head
split against Pythagoras, direct feature attribution against the encoder and against ablating
a source's value vector in the model, the store's heads table, and the Feature page's chart."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from sae.analyze import AnalyzeConfig, analyze
from sae.attention_heads import (
    attention_inputs,
    direct_feature_attribution,
    head_split,
    linear_encoder,
    n_heads_of,
)
from sae.base import DictionaryError
from tests.sae_cases import small
from workbench.cache_reader import ActivationCache
from workbench.store import STORE_FILE, FeatureStore

LAYER = 1
HOOK_Z = f"blocks.{LAYER}.attn.hook_z"
MAIN = str(Path(__file__).resolve().parents[1] / "app" / "explorer" / "main.py")
PROMPT = "ROMEO: my lord, my lord, the king is come; the king, my lord"


@pytest.fixture(scope="module")
def z_cache(tiny_model, tiny_cache, tmp_path_factory):
    """The tiny model at blocks.1.attn.hook_z on the first 16 windows (of 32 tokens) of the
    session's cache (its windows reused: tokenizing the corpus again would cost seconds)."""
    from workbench.activations import CacheConfig, write_cache

    out = tmp_path_factory.mktemp("z-cache") / "cache"
    config = CacheConfig(
        model="tiny",
        hooks=(HOOK_Z,),
        tokens=512,
        context_length=32,
        batch_size=16,
        shard_tokens=512,
        out=str(out),
    )
    windows = ActivationCache(tiny_cache).tokens[:16]
    write_cache(out, config, tiny_model, [HOOK_Z], windows, progress=False)
    return out


def z_dictionary(arch: str, cache, seed: int = 0):
    """A 24-latent dictionary at HOOK_Z whose latents point at centred cache rows (so most fire),
    with decoder rows of uneven norms (a free-norm decoder must split right too)."""
    sample = ActivationCache(cache).shard(HOOK_Z, 0).float()[1::5]
    dictionary = small(arch, seed=seed, d_in=sample.shape[1], n_latents=24, k=4, aux_k=0, target_l0=4)
    generator = torch.Generator().manual_seed(seed)
    picks = sample[torch.randperm(len(sample), generator=generator)[:24]] - sample.mean(0)
    with torch.no_grad():
        dictionary.W_enc.copy_(picks / picks.norm(dim=1, keepdim=True))
        dictionary.W_dec.copy_(dictionary.W_enc * (0.5 + torch.rand(24, 1, generator=generator)))
        dictionary.b_dec.copy_(sample.mean(0))
    dictionary.meta = {"hook": HOOK_Z}
    return dictionary


@pytest.fixture(scope="module")
def z_run(tiny_model, tiny_model_dir, z_cache, tmp_path_factory):
    """A saved TopK hook_z dictionary folder with its feature store."""
    from sae.io import load, save

    folder = tmp_path_factory.mktemp("z-run") / "topk-z"
    save(z_dictionary("topk", z_cache), folder, hook=HOOK_Z, model=str(tiny_model_dir), cache=str(z_cache))
    config = AnalyzeConfig(top=4, quantile_bins=2, per_bin=2, context_before=4, context_after=2)
    analyze(load(folder), config, folder=folder, model=tiny_model, progress=False)
    return folder


def test_head_split_norms_square_sum_to_the_decoder_norm():
    W_dec = torch.randn(50, 24, generator=torch.Generator().manual_seed(3)) * torch.rand(50, 1) * 4
    W_dec[0] = 0
    W_dec[1, :] = 0
    W_dec[1, 8:12] = 2.0  # all its weight in head 2 of 6
    split = head_split(W_dec, 6)
    assert split.norms.shape == split.shares.shape == (50, 6)
    np.testing.assert_allclose(split.norms.pow(2).sum(1), W_dec.double().norm(dim=1).pow(2), rtol=1e-12)
    np.testing.assert_allclose(split.shares[2:].sum(1), np.ones(48), rtol=1e-12)
    assert split.shares[0].sum() == 0 and split.shares[1].tolist() == [0, 0, 1, 0, 0, 0]
    assert float(split.norms[5, 3]) == pytest.approx(float(W_dec[5, 12:16].double().norm()))  # head-major
    with pytest.raises(DictionaryError, match="cannot split into 5 heads"):
        head_split(W_dec, 5)


@pytest.mark.parametrize("arch", ["topk", "gated"])  # ReLU: the ablation test below
def test_dfa_terms_sum_to_the_encoder_pre_activation(arch, tiny_model, z_cache):
    dictionary = z_dictionary(arch, z_cache, seed=1)
    tokens = tiny_model.tokenize(PROMPT)[0]
    _, _, z = attention_inputs(tiny_model, tokens, LAYER)
    codes = dictionary.encode(z[1:].float()).to_dense()  # the features that fire on the prompt
    checked = 0
    for feature in torch.argsort(codes.sum(0), descending=True)[:2].tolist():
        for position in (None, len(tokens) - 1):
            got = direct_feature_attribution(tiny_model, dictionary, tokens, feature, position)
            assert got.terms.shape == (n_heads_of(tiny_model), got.position + 1)
            assert float(got.terms.sum()) + got.bias == pytest.approx(got.pre_activation, abs=1e-4)
            if got.activation > 0 and arch != "gated":  # where it fires, the activation is the pre-activation
                assert got.activation == pytest.approx(got.pre_activation, rel=1e-4, abs=1e-4)
            checked += got.activation > 0
        assert got.activations[got.position] == pytest.approx(got.activation)
    assert checked > 0  # some attributed features do fire on the prompt


def test_dfa_of_a_source_equals_ablating_its_values(tiny_model, z_cache):
    """Zeroing v at source s (the pattern does not read v) moves the pre-activation by exactly
    -sum_h DFA[h, s]: the attribution is checked against a real intervention."""
    dictionary = z_dictionary("relu", z_cache, seed=2)
    tokens = tiny_model.tokenize(PROMPT)[0]
    position, feature = len(tokens) - 1, 5
    got = direct_feature_attribution(tiny_model, dictionary, tokens, feature, position)
    encoder = linear_encoder(dictionary, feature)
    for source in (0, 2, position):

        def ablate(v, hook=None, s=source):
            v = v.clone()
            v[:, s] = 0
            return v

        captured = {}
        hooks = [
            (f"blocks.{LAYER}.attn.hook_v", ablate),
            (HOOK_Z, lambda z, hook=None: captured.setdefault("z", z)),
        ]
        with torch.no_grad(), tiny_model.hooks(hooks):
            tiny_model(tokens[None])
        z = captured["z"][0, position].reshape(-1).double()
        ablated = float(encoder.row @ (z - encoder.b_dec)) + encoder.bias
        change = ablated - got.pre_activation
        assert change == pytest.approx(-float(got.terms[:, source].sum()), abs=1e-4)
    assert got.terms.abs().sum() > 1e-3  # not trivially zero


def test_attention_inputs_rebuild_hook_z(tiny_model):
    pattern, values, z = attention_inputs(tiny_model, tiny_model.tokenize(PROMPT)[0], LAYER)
    rebuilt = torch.einsum("hqs,shd->qhd", pattern, values).reshape(z.shape)
    np.testing.assert_allclose(rebuilt, z, atol=1e-5, rtol=1e-5)
    assert torch.triu(pattern, diagonal=1).abs().max() == 0  # causal


def test_dfa_refuses_other_hooks_and_codebooks(tiny_model, z_cache):
    tokens = tiny_model.tokenize(PROMPT)[0]
    resid = z_dictionary("topk", z_cache)
    resid.meta = {"hook": "blocks.1.hook_resid_post"}
    with pytest.raises(DictionaryError, match="needs a hook_z dictionary"):
        direct_feature_attribution(tiny_model, resid, tokens, 0)
    codebook = small("codebook", d_in=resid.d_in, n_latents=8, k=2)
    codebook.meta = {"hook": HOOK_Z}
    with pytest.raises(DictionaryError, match="no linear encoder"):
        direct_feature_attribution(tiny_model, codebook, tokens, 0)
    with pytest.raises(DictionaryError, match="outside"):
        direct_feature_attribution(tiny_model, z_dictionary("topk", z_cache), tokens, 0, position=999)


def test_analyze_stores_the_head_split_for_hook_z_only(z_run, tiny_run, tiny_model):
    from sae.io import load

    store, dictionary = FeatureStore(z_run), load(z_run)
    heads = n_heads_of(tiny_model)
    assert store.meta["n_heads"] == heads and FeatureStore(tiny_run).meta["n_heads"] == 0
    split = head_split(dictionary.W_dec, heads)
    for feature in (0, 7, 23):
        page = store.feature(feature)
        assert page.heads["head"].tolist() == list(range(heads))
        np.testing.assert_allclose(page.heads.norm, split.norms[feature], rtol=1e-5)
        np.testing.assert_allclose(page.heads.share, split.shares[feature], rtol=1e-5)
    assert FeatureStore(tiny_run).feature(3).heads.empty
    # logit effects of a hook_z feature are those of what the layer writes, W_dec W_O
    page = store.feature(7)
    W_O = tiny_model.bridge.W_O[LAYER].detach().reshape(dictionary.d_in, -1)
    effect = (dictionary.W_dec[7].detach() @ W_O).float()
    effect = effect - effect.mean()  # GPT-2's final LayerNorm centres
    from sae.analyze import final_norm_map

    _, scale = final_norm_map(tiny_model)
    best = int(((effect * scale) @ tiny_model.unembed.float()).argmax())
    assert page.logits[page.logits.side == "top"].token.iloc[0] == best


def test_version_2_stores_open_without_heads(z_run, tmp_path):
    old = tmp_path / "v2.duckdb"
    shutil.copy(z_run / STORE_FILE, old)
    with duckdb.connect(str(old)) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [json.dumps(2)])
        con.execute("DROP TABLE heads")
    page = FeatureStore(old).feature(2)
    assert page.heads.empty and page.top


def test_feature_page_charts_head_shares_and_attributes_sources(z_run, tmp_path, monkeypatch):
    """The chart and the attribution on the hook_z store; then, on a copy of it whose model is
    not on this machine, the chart and a one-line note instead of the attribution."""
    import os

    from streamlit.testing.v1 import AppTest

    moved = tmp_path / STORE_FILE
    shutil.copy(z_run / STORE_FILE, moved)
    with duckdb.connect(str(moved)) as con:
        con.execute("UPDATE meta SET value = ? WHERE key = 'model'", [json.dumps(str(tmp_path / "no-model"))])
    monkeypatch.setenv("WORKBENCH_STORES", os.pathsep.join([str(z_run), str(moved)]))
    store = FeatureStore(z_run)
    feature = int(store.features(limit=1).feature[0])
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.run()
    at.switch_page("views/feature.py")
    at.query_params["feature"] = str(feature)
    at.run()
    assert not at.exception, at.exception
    chart = next(c for c in at.get("plotly_chart") if "head_shares" in str(c.proto.id))
    figure = json.loads(chart.proto.spec)
    shares = store.feature(feature).heads.share
    np.testing.assert_allclose(figure["data"][0]["y"], shares, rtol=1e-6)
    at.button(key="dfa_run").click().run()
    assert not at.exception, at.exception
    shown = " ".join(h.proto.body for h in at.get("html"))
    assert "wb-dfa" in shown and "all heads" in shown
    note = next(c.value for c in at.caption if c.value.startswith("pre-activation"))
    pre, total, bias = (float(v) for v in re.findall(r"(?:pre-activation|terms|bias) (-?[\d.e+-]+)", note))
    assert total + bias == pytest.approx(pre, rel=1e-3, abs=1e-3)
    live, stored = re.search(r"activation (\S+) \(stored (\S+)\)", note).groups()
    assert live == stored and "Note" not in note  # the whole cache window was run, as analyzed

    at.query_params["store"] = str(moved)  # the copy without its model
    at.run()
    at.button(key="dfa_run").click().run()
    assert not at.exception, at.exception
    note = [c.value for c in at.caption if c.value.startswith("Source attribution needs")]
    assert len(note) == 1 and "\n" not in note[0] and "no-model" in note[0]
    assert "wb-dfa" not in " ".join(h.proto.body for h in at.get("html"))
    assert [c for c in at.get("plotly_chart") if "head_shares" in str(c.proto.id)]
