"""Steering edits every forward pass: KV-cached generation equals full recomputation, steered."""

from __future__ import annotations

import torch

from sae.steering import add, generate_pair, steer
from tests.conftest import STORE_HOOK, tiny_dictionary


def test_cached_generation_is_steered_on_every_token(tiny_model, tiny_cache):
    dictionary = tiny_dictionary("topk", tiny_cache)
    edits = [add(dictionary, 5, 12.0)]
    prompt = "ROMEO:\nBut soft"
    baseline, steered = generate_pair(tiny_model, edits, prompt, max_new_tokens=12, do_sample=False)
    assert steered != baseline
    tokens = tiny_model.tokenize(steered)
    n_prompt = tiny_model.tokenize(prompt).shape[1]
    with torch.no_grad(), steer(tiny_model, edits):
        logits = tiny_model(tokens)  # one full pass over prompt + generated tokens, steered everywhere
    # greedy decoding with the KV cache chose, at every step, what the full steered pass predicts
    assert torch.equal(logits[0, n_prompt - 1 : -1].argmax(-1), tokens[0, n_prompt:])


def test_steering_adds_the_decoder_direction_at_the_hook(tiny_model, tiny_cache):
    dictionary = tiny_dictionary("topk", tiny_cache)
    tokens = tiny_model.tokenize("JULIET:\nO Romeo")
    clean = tiny_model.run_with_cache(tokens, [STORE_HOOK])[STORE_HOOK]
    seen = []
    with steer(tiny_model, [add(dictionary, 7, 3.0)]):
        with tiny_model.hooks([("blocks.1.hook_resid_pre", lambda a, hook=None: seen.append(a.detach()))]):
            tiny_model(tokens)
    torch.testing.assert_close(seen[0], clean + 3.0 * dictionary.W_dec[7].detach(), atol=1e-5, rtol=1e-5)


def feature_activation(dictionary, x, feature):
    return dictionary.encode(x).to_dense()[:, feature].view(x.shape[:-1])


def test_clamp_and_ablate_move_only_the_features_contribution(tiny_model, tiny_cache):
    from sae.steering import ablate, clamp

    dictionary = tiny_dictionary("topk", tiny_cache)
    tokens = tiny_model.tokenize("JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?")
    x = tiny_model.run_with_cache(tokens, [STORE_HOOK])[STORE_HOOK]
    with torch.no_grad():
        acts = dictionary.encode(x[0]).to_dense()
    fires = int((acts > 0).sum(0).argmax())  # a feature active on several tokens
    silent = int((acts > 0).sum(0).argmin())
    assert (acts[:, silent] == 0).all() and (acts[:, fires] > 0).sum() >= 2
    d = dictionary.W_dec.detach()
    for edit, expected in (
        (ablate(dictionary, fires), x - acts[:, fires].view(1, -1, 1) * d[fires]),
        (clamp(dictionary, fires, 5.0), x + (5.0 - acts[:, fires]).view(1, -1, 1) * d[fires]),
    ):
        seen = []
        with steer(tiny_model, [edit]):
            with tiny_model.hooks(
                [("blocks.1.hook_resid_pre", lambda a, hook=None: seen.append(a.detach()))]
            ):
                tiny_model(tokens)
        torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        clean = tiny_model(tokens)
        with steer(tiny_model, [ablate(dictionary, silent)]):
            assert torch.equal(tiny_model(tokens), clean)  # ablating a silent feature changes nothing


def test_public_names_stay_callable_after_their_modules_load():
    import sae
    import sae.dose_response  # noqa: F401
    import sae.evals  # noqa: F401 - imports sae.splicing
    import sae.steering  # noqa: F401

    for name in (
        "splice",
        "steer",
        "add",
        "clamp",
        "ablate",
        "add_direction",
        "code_on",
        "code_off",
        "sweep",
    ):
        assert callable(getattr(sae, name)) and not isinstance(getattr(sae, name), type(sae)), name


def _greedy_matches_full_pass(model, edits, prompt, positions_of, max_new_tokens=10):
    """Generate with a steer at positions=`kind`; a full pass over the result, steered with the
    equivalent absolute mask, must predict every generated token (greedy)."""
    from sae.steering import steer

    n_prompt = model.tokenize(prompt).shape[1]
    results = {}
    for kind in ("prompt", "generated"):
        with torch.no_grad(), steer(model, edits, positions=kind) as report:
            text = model.generate(prompt, max_new_tokens=max_new_tokens)
        tokens = model.tokenize(text)
        mask = positions_of(kind, n_prompt, tokens.shape[1])
        with torch.no_grad(), steer(model, edits, positions=mask):
            logits = model(tokens)
        assert torch.equal(logits[0, n_prompt - 1 : -1].argmax(-1), tokens[0, n_prompt:]), kind
        results[kind] = (text, report)
    return n_prompt, results


def test_positions_prompt_and_generated_match_full_recomputation(tiny_model, tiny_cache):
    dictionary = tiny_dictionary("topk", tiny_cache)
    edits = [add(dictionary, 5, 12.0)]
    prompt = "ROMEO:\nBut soft"

    def positions_of(kind, n_prompt, total):
        where = torch.arange(total) < n_prompt
        return where if kind == "prompt" else ~where

    n_prompt, results = _greedy_matches_full_pass(tiny_model, edits, prompt, positions_of)
    baseline = tiny_model.generate(prompt, max_new_tokens=10)
    everywhere = generate_pair(tiny_model, edits, prompt, max_new_tokens=10, do_sample=False)[1]
    assert results["prompt"][0] != baseline and results["generated"][0] != baseline
    assert (
        len({results["prompt"][0], results["generated"][0], everywhere}) == 3
    )  # three different interventions
    # the report counts what was edited: the prompt once; then 9 decode passes of one token each
    assert results["prompt"][1].positions_edited == {STORE_HOOK: n_prompt}
    assert results["generated"][1].positions_edited == {STORE_HOOK: 9} and results["generated"][1].passes == {
        STORE_HOOK: 10
    }
    assert "9 positions in 10 passes" in str(results["generated"][1])


def test_bad_positions_are_one_line_errors(tiny_model, tiny_cache):
    import pytest

    from sae.base import DictionaryError

    edits = [add(tiny_dictionary("topk", tiny_cache), 5, 1.0)]
    for bad in ("middle", torch.ones(4), torch.ones(2, 2, 2, dtype=torch.bool)):
        with pytest.raises(DictionaryError, match="positions"):
            with steer(tiny_model, edits, positions=bad):
                pass
    with pytest.raises(DictionaryError, match="mask of 3 rows cannot steer a batch of 1"):
        with steer(tiny_model, edits, positions=torch.ones(3, 8, dtype=torch.bool)):
            tiny_model(tiny_model.tokenize("ROMEO:\nBut soft"))


def _codebook(tiny_cache):
    from sae.base import create
    from sae.config import DictionaryConfig
    from workbench.cache_reader import ActivationCache

    sample = ActivationCache(tiny_cache).shard(STORE_HOOK, 0).float()
    book = create(DictionaryConfig(architecture="codebook", d_in=sample.shape[1], n_latents=16, k=2))
    with torch.no_grad():
        book.initialize_from(sample)
    book.meta = {"hook": STORE_HOOK}
    return book


def test_code_on_and_code_off_move_exactly_one_code(tiny_model, tiny_cache):
    import pytest

    from sae.base import DictionaryError
    from sae.steering import code_off, code_on

    book = _codebook(tiny_cache)
    tokens = tiny_model.tokenize("JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?")
    x = tiny_model.run_with_cache(tokens, [STORE_HOOK])[STORE_HOOK]
    with torch.no_grad():
        chosen = book.encode(x[0]).to_dense()  # [P, codes], 1 where a code is chosen
    code = int(chosen.sum(0).argmax())
    c = book.W_dec[code].detach()
    for edit, expected in (
        (code_off(book, code), x - chosen[:, code].view(1, -1, 1) * c),
        (code_on(book, code), x + (1 - chosen[:, code]).view(1, -1, 1) * c),
    ):
        seen = []
        with steer(tiny_model, [edit]):
            with tiny_model.hooks(
                [("blocks.1.hook_resid_pre", lambda a, hook=None: seen.append(a.detach()))]
            ):
                tiny_model(tokens)
        torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(DictionaryError, match="codebook"):
        code_on(tiny_dictionary("topk", tiny_cache), 1)


def test_splice_with_the_error_term_leaves_the_model_unchanged(tiny_model, tiny_cache):
    from sae.splicing import splice

    dictionary = tiny_dictionary("topk", tiny_cache)
    tokens = tiny_model.tokenize("KING HENRY:\nOnce more unto the breach, dear friends")
    with torch.no_grad():
        plain = tiny_model(tokens)
        with splice(tiny_model, dictionary, error_term=True):
            with_error = tiny_model(tokens)
        with splice(tiny_model, dictionary):
            without = tiny_model(tokens)
    torch.testing.assert_close(with_error, plain, atol=1e-5, rtol=1e-5)
    assert (without - plain).abs().max() > 1e-2  # the reconstruction alone is not the model


def test_sweep_is_a_dose_response(tiny_model, tiny_cache):
    import pytest

    from sae.base import DictionaryError
    from sae.dose_response import figure, sweep

    dictionary = tiny_dictionary("topk", tiny_cache)
    feature = 5
    with torch.no_grad():  # the token the feature's direction promotes most, through the unembedding
        promoted = int((dictionary.W_dec[feature] @ tiny_model.unembed).argmax())
    prompts = ["ROMEO:\nBut soft", "JULIET:\nO Romeo"]
    neutral = "KING HENRY:\nOnce more unto the breach, dear friends, once more"
    rows = sweep(
        tiny_model,
        add(dictionary, feature, 0.0),
        [0.0, 8.0, 24.0],
        prompts,
        concept=[promoted],
        neutral_text=neutral,
        max_new_tokens=8,
    )
    assert [r.strength for r in rows] == [0.0, 8.0, 24.0]
    assert rows[0].kl_neutral == pytest.approx(0.0, abs=1e-6)
    assert rows[0].example == tiny_model.generate(prompts[0], max_new_tokens=8)  # strength 0 = the model
    assert rows[2].concept_rate > rows[0].concept_rate and rows[2].kl_neutral > rows[1].kl_neutral > 0
    assert rows[2].fluency < rows[0].fluency  # the unsteered model finds the steered text less likely
    fig = figure(rows)
    assert [list(t.y) for t in fig.data] == [[r.concept_rate for r in rows], [r.kl_neutral for r in rows]]
    scored = sweep(
        tiny_model,
        add(dictionary, feature, 0.0),
        [0.0],
        prompts[:1],
        concept=lambda text: float(len(text)),
        neutral_text=neutral,
        max_new_tokens=4,
    )
    assert scored[0].concept_rate > 0
    with pytest.raises(DictionaryError, match="at least one prompt"):
        sweep(tiny_model, add(dictionary, feature, 0.0), [1.0], [], concept=[promoted], neutral_text=neutral)
