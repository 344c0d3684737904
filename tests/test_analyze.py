"""The feature store builder against a dense reference: every statistic, example and table of
`sae.analyze` recomputed from the dictionary's dense activations over the whole cache."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae.analyze import AnalyzeConfig, analyze, final_norm_map
from sae.per_feature import SmallestKeys
from tests.conftest import STORE_HOOK, tiny_dictionary
from workbench.cache_reader import ActivationCache
from workbench.store import FeatureStore

CONFIG = AnalyzeConfig(
    top=5,
    quantile_bins=4,
    per_bin=2,
    context_before=3,
    context_after=2,
    cooccurrence_rows=6000,
    cooccurrence_width=48,
    block_windows=5,
)


def dense_reference(dictionary, cache: ActivationCache):
    x = torch.cat([cache.shard(STORE_HOOK, i) for i in range(cache.n_shards(STORE_HOOK))]).float()
    with torch.no_grad():
        acts = dictionary.encode(x).to_dense()
    body = torch.arange(len(x)) % cache.context_length != 0
    acts[~body] = 0
    return x, acts, body


@pytest.fixture(scope="module", params=["topk", "jumprelu"])
def built(request, tiny_model, tiny_cache, tmp_path_factory):
    """(store, dictionary, cache) for a fixed-k (TopK) and a variable-k (JumpReLU) dictionary."""
    dictionary = tiny_dictionary(request.param, tiny_cache)
    out = tmp_path_factory.mktemp("analyze") / "features.duckdb"
    config = AnalyzeConfig(**{**CONFIG.__dict__, "cache": str(tiny_cache), "out": str(out)})
    analyze(dictionary, config, model=tiny_model, progress=False)
    return FeatureStore(out), dictionary, ActivationCache(tiny_cache)


def test_statistics_equal_the_dense_reference(built):
    store, dictionary, cache = built
    _, acts, body = dense_reference(dictionary, cache)
    table = store.features(order_by="feature", descending=False, limit=10_000)
    fired = (acts > 0).sum(0)
    assert store.meta["tokens_analyzed"] == int(body.sum())
    assert fired.sum() > 0 and table.fired.tolist() == fired.tolist()
    np.testing.assert_allclose(table.density, fired.double() / body.sum(), rtol=1e-12)
    np.testing.assert_allclose(table.max_activation, acts.max(0).values, rtol=1e-6)
    mean = torch.where(fired > 0, acts.sum(0).double() / fired.clamp_min(1), torch.zeros(()))
    np.testing.assert_allclose(table.mean_activation, mean, rtol=1e-5)
    edges = np.asarray(store.histogram_edges())
    for feature in range(0, dictionary.n_latents, 7):
        values = acts[:, feature][acts[:, feature] > 0].double().numpy()
        expected = np.bincount((values[:, None] > edges[None, 1:-1]).sum(1), minlength=len(edges) - 1)
        assert store.feature(feature).histogram == expected.tolist()


def test_top_examples_are_the_dense_top_with_their_contexts(built):
    store, dictionary, cache = built
    _, acts, _ = dense_reference(dictionary, cache)
    ctx, tokens = cache.context_length, cache.tokens
    checked = 0
    for feature in range(dictionary.n_latents):
        page = store.feature(feature)
        column = acts[:, feature]
        expected = column.topk(min(CONFIG.top, int((column > 0).sum()))).values
        got = torch.tensor([e.activation for e in page.top])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        for example in page.top:
            row = example.window * ctx + example.position
            assert column[row] == pytest.approx(example.activation, rel=1e-5)
            span = torch.arange(len(example.tokens)) + example.window * ctx + example.start
            torch.testing.assert_close(torch.tensor(example.activations), column[span], rtol=1e-5, atol=1e-6)
            assert (
                example.tokens
                == tokens[example.window, example.start : example.start + len(example.tokens)].tolist()
            )
            assert example.start <= example.position < example.start + len(example.tokens)
            checked += 1
    assert checked > 3 * dictionary.n_latents


def test_quantile_examples_are_real_firings_in_ascending_groups(built):
    store, dictionary, cache = built
    _, acts, _ = dense_reference(dictionary, cache)
    groups_seen = 0
    for feature in range(dictionary.n_latents):
        page = store.feature(feature)
        by_group: dict[int, list[float]] = {}
        for example in page.quantiles:
            row = example.window * cache.context_length + example.position
            assert (
                acts[row, feature] == pytest.approx(example.activation, rel=1e-5) and example.activation > 0
            )
            by_group.setdefault(example.bin, []).append(example.activation)
        groups = sorted(by_group)
        for low, high in zip(groups, groups[1:]):
            assert max(by_group[low]) <= min(by_group[high])
        assert all(len(v) <= CONFIG.per_bin for v in by_group.values())
        groups_seen += len(groups)
    assert groups_seen >= dictionary.n_latents  # most features fill several groups


def test_neurons_and_cooccurrence_equal_the_reference(built):
    store, dictionary, cache = built
    x, acts, body = dense_reference(dictionary, cache)
    x, acts = x[body].double(), acts[body].double()
    for feature in range(0, dictionary.n_latents, 5):
        page = store.feature(feature)
        if page.fired == 0:
            assert page.cooccurrence.empty
            continue
        corr = torch.corrcoef(torch.cat([acts[:, feature : feature + 1], x], 1).T)[0, 1:]
        best = int(corr.abs().argmax())
        assert int(page.neurons.neuron[0]) == best
        assert page.neurons.correlation[0] == pytest.approx(float(corr[best]), abs=1e-4)
        fires = acts[:, feature] > 0
        rate = ((acts[fires] > 0).sum(0).double() / fires.sum()).numpy()
        rate[feature] = 0
        assert page.fired <= CONFIG.cooccurrence_rows  # every firing row was kept: the rates are exact
        for row in page.cooccurrence.itertuples():
            assert row.rate == pytest.approx(rate[row.other], rel=1e-5)
        assert page.cooccurrence.rate.iloc[0] == pytest.approx(rate.max(), rel=1e-5)


def test_neighbours_and_logit_effects_follow_their_formulas(built, tiny_model):
    store, dictionary, _ = built
    W = dictionary.W_dec.detach().double()
    unit = W / W.norm(dim=1, keepdim=True)
    centres, scale = final_norm_map(tiny_model)
    assert centres and scale is not None  # GPT-2's final LayerNorm
    directions = (W - W.mean(1, keepdim=True)) * scale.double()
    effects = directions @ tiny_model.unembed.double()
    for feature in (0, 17, 47):
        page = store.feature(feature)
        cosine = unit @ unit[feature]
        cosine[feature] = -2
        assert page.neighbours.other.tolist() == cosine.topk(CONFIG.neighbours).indices.tolist()
        top = page.logits[page.logits.side == "top"]
        bottom = page.logits[page.logits.side == "bottom"]
        assert top.token.tolist() == effects[feature].topk(CONFIG.logit_tokens).indices.tolist()
        assert (
            bottom.token.tolist()
            == effects[feature].topk(CONFIG.logit_tokens, largest=False).indices.tolist()
        )
        np.testing.assert_allclose(top.effect, effects[feature].topk(CONFIG.logit_tokens).values, rtol=1e-4)


def test_block_size_and_token_budget(tiny_model, tiny_cache, tmp_path):
    dictionary = tiny_dictionary("topk", tiny_cache)
    stores = []
    for blocks in (1, 16):
        out = tmp_path / f"b{blocks}.duckdb"
        analyze(
            dictionary,
            AnalyzeConfig(cache=str(tiny_cache), out=str(out), block_windows=blocks, top=4),
            model=tiny_model,
            progress=False,
        )
        stores.append(FeatureStore(out))
    a, b = (s.features(order_by="feature", descending=False, limit=100) for s in stores)
    assert a.equals(b)
    assert [e.activation for e in stores[0].feature(3).top] == [
        e.activation for e in stores[1].feature(3).top
    ]
    out = tmp_path / "budget.duckdb"
    analyze(
        dictionary,
        AnalyzeConfig(cache=str(tiny_cache), out=str(out), tokens=100),
        model=tiny_model,
        progress=False,
    )
    assert FeatureStore(out).meta["tokens_analyzed"] == 4 * 31  # ceil(100 / 32) windows, BOS rows skipped


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 5),
    st.lists(st.integers(0, 60), min_size=1, max_size=6),
    st.integers(0, 10**6),
)
def test_smallest_keys_equals_sorting_the_whole_stream(n_latents, size, chunks, seed):
    generator = torch.Generator().manual_seed(seed)
    kept = SmallestKeys(n_latents, size, {"id": ((), torch.long), "pair": ((2,), torch.float32)})
    all_features, all_keys = [], []
    offset = 0
    for length in chunks:
        features = torch.randint(0, n_latents, (length,), generator=generator)
        keys = torch.rand(length, generator=generator)
        ids = torch.arange(offset, offset + length)
        kept.offer(
            features, keys, lambda idx: {"id": ids[idx], "pair": torch.stack([keys[idx], -keys[idx]], 1)}
        )
        all_features.append(features)
        all_keys.append(keys)
        offset += length
    features, keys = torch.cat(all_features), torch.cat(all_keys)
    for feature in range(n_latents):
        mine = keys[features == feature].sort().values[:size]
        count = len(mine)
        slots = kept.in_key_order()[feature, :count]
        assert int(kept.count()[feature]) == count
        torch.testing.assert_close(kept.keys[feature, slots], mine)
        torch.testing.assert_close(keys[kept.data["id"][feature, slots]], mine)
        torch.testing.assert_close(kept.data["pair"][feature, slots, 1], -mine)
        assert kept.worst[feature] == (mine[-1] if count == size else float("inf"))


def test_codebook_codes_are_features_of_the_store(tiny_model, tiny_cache, tmp_path):
    from sae.base import create
    from sae.config import DictionaryConfig

    cache = ActivationCache(tiny_cache)
    codebook = create(
        DictionaryConfig(architecture="codebook", d_in=cache.width(STORE_HOOK), n_latents=32, k=2), seed=0
    )
    with torch.no_grad():
        codebook.initialize_from(cache.shard(STORE_HOOK, 0).float())
    codebook.meta = {"hook": STORE_HOOK}
    out = tmp_path / "codes.duckdb"
    analyze(
        codebook, AnalyzeConfig(cache=str(tiny_cache), out=str(out), top=3), model=tiny_model, progress=False
    )
    store = FeatureStore(out)
    table = store.features(limit=100)
    assert store.meta["architecture"] == "codebook"
    assert table.fired.sum() == 2 * store.meta["tokens_analyzed"]  # every token picks exactly k codes
    assert (table.max_activation[table.fired > 0] == 1.0).all()
    busiest = store.feature(int(table.feature[0]))
    assert len(busiest.top) == 3 and all(e.activation == 1.0 for e in busiest.top)


def _examples(rows: list[tuple]) -> pa.Table:
    """An examples table from (feature, kind, window, position, start, tokens, activations)."""
    from workbench.store import list_column

    columns = list(zip(*rows))
    peak = [acts[pos - start] for _, _, _, pos, start, _, acts in rows]
    return pa.table(
        {
            "feature": np.array(columns[0], np.int32),
            "kind": list(columns[1]),
            "bin": np.zeros(len(rows), np.int16),
            "rank": np.arange(len(rows), dtype=np.int16),
            "activation": np.array(peak, np.float32),
            "window_id": np.array(columns[2], np.int32),
            "position": np.array(columns[3], np.int16),
            "start": np.array(columns[4], np.int16),
            "tokens": list_column(np.array(columns[5], np.int32), pa.int32()),
            "activations": list_column(np.array(columns[6], np.float32), pa.float32()),
        }
    )


TEXTS = ["<bos>", "KING", " LORD", ":", "\n", " EDWARD", " LEAR", " JOHN", "x"]


def test_summaries_name_peak_tokens_a_dominant_neighbour_and_promoted_logits():
    from sae.summaries import NEVER_FIRED, feature_summaries, token_features_table

    kept = _examples(
        [
            (0, "top", 0, 1, 0, [0, 1, 3, 4], [0, 5, 0, 0]),  # KING, then ":"
            (0, "top", 1, 1, 0, [0, 1, 3, 8], [0, 4, 0, 0]),
            (0, "top", 2, 2, 0, [8, 8, 1, 3], [0, 0, 3, 0]),
            (0, "quantile", 3, 1, 0, [8, 2, 4, 8], [0, 2, 0, 0]),  # " LORD", then a newline
            (0, "quantile", 0, 1, 0, [0, 1, 3, 4], [0, 5, 0, 0]),  # the first again: counted once
            (0, "quantile", 5, 1, 0, [8, 2, 3, 8], [0, 2.5, 0, 0]),
            (0, "quantile", 6, 1, 0, [8, 8, 3, 8], [0, 1, 0, 0]),  # a runner-up seen once: not named
            (2, "top", 4, 1, 0, [0, 4, 8, 8], [0, 1.0, 0.5, 0]),  # a newline peak, "x" firing after
        ]
    )
    logits = pa.table(
        {
            "feature": np.zeros(8, np.int32),
            "side": ["top"] * 4 + ["bottom"] * 4,
            "rank": np.array([3, 0, 1, 2, 0, 1, 2, 3], np.int16),
            "token": np.array([8, 5, 6, 7, 1, 2, 3, 4], np.int32),
            "effect": np.array([1, 4, 3, 2, -4, -3, -2, -1], np.float32),
        }
    )
    lines = feature_summaries(kept, logits, TEXTS, n_latents=3, context_length=4)
    assert lines == [
        '"KING" ×3 · " LORD" ×2 · before ":" → " EDWARD", " LEAR", " JOHN"',
        NEVER_FIRED,
        '"\\n" ×1',
    ]
    index = token_features_table(kept, context_length=4).to_pandas()
    assert index.token.is_monotonic_increasing
    rows = {(r.token, r.feature): (r.hits, r.peaks, r.max_activation) for r in index.itertuples()}
    assert rows == {
        (1, 0): (3, 3, 5.0),
        (2, 0): (2, 2, 2.5),
        (8, 0): (1, 1, 1.0),
        (4, 2): (1, 1, 1.0),
        (8, 2): (1, 0, 0.5),
    }


def test_byte_tokens_of_a_byte_level_bpe_read_as_their_bytes(tiny_model):
    import re

    from sae.summaries import _byte_decoder, vocab_texts

    tokenizer = tiny_model.tokenizer
    texts = vocab_texts(tokenizer, tiny_model.d_vocab)
    decoder = _byte_decoder()
    encoder = {byte: char for char, byte in decoder.items()}
    broken = [i for i in range(len(texts)) if "\ufffd" in tokenizer.decode([i])]
    assert len(broken) > 50  # every lone byte >= 0x80 of the base alphabet
    for token in broken:
        raw = bytes(decoder[c] for c in tokenizer.convert_ids_to_tokens(token))
        parts = re.split(r"<0x([0-9A-F]{2})>", texts[token])
        rebuilt = b"".join(bytes([int(p, 16)]) if i % 2 else p.encode() for i, p in enumerate(parts))
        assert "\ufffd" not in texts[token] and rebuilt == raw
    assert texts[tokenizer.convert_tokens_to_ids(encoder[0xE2])] == "<0xE2>"
    readable = [i for i in range(len(texts)) if i not in set(broken)]
    assert all(texts[i] == tokenizer.decode([i]) for i in readable)


def test_context_activations_equal_a_direct_encode_of_the_cache_rows(tiny_run, tiny_cache):
    from sae.contexts import context_activations
    from sae.io import load

    store = FeatureStore(tiny_run)
    cache = ActivationCache(tiny_cache)
    x = torch.cat([cache.shard(STORE_HOOK, i) for i in range(cache.n_shards(STORE_HOOK))]).float()
    dictionary = load(tiny_run)
    feature = int(store.features(limit=1).feature[0])
    page = store.feature(feature)
    other = (feature + 1) % store.n_latents
    for example, which in ((page.top[0], None), (page.quantiles[-1], None), (page.top[0], other)):
        tokens, acts = context_activations(store, example, radius=10, feature=which)
        span, start = store.long_context(example, 10)
        rows = example.window * cache.context_length + start + torch.arange(len(span))
        with torch.no_grad():
            expected = dictionary.encode(x[rows]).to_dense()[:, which if which is not None else feature]
        if start == 0:
            expected[0] = 0  # the BOS row, as analyze
        assert tokens == span and len(span) > len(example.tokens)
        torch.testing.assert_close(torch.tensor(acts), expected, rtol=1e-5, atol=1e-6)
        if which is None:  # the stored short context is a slice of it
            offset = example.start - start
            stored = torch.tensor(acts[offset : offset + len(example.activations)])
            torch.testing.assert_close(stored, torch.tensor(example.activations), rtol=1e-5, atol=1e-6)
    store.meta["dictionary_path"] = str(tiny_run / "gone")
    assert context_activations(store, page.top[0]) is None
