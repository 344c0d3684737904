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
    assert torch.equal(logits[0, n_prompt - 1:-1].argmax(-1), tokens[0, n_prompt:])


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
    for edit, expected in ((ablate(dictionary, fires), x - acts[:, fires].view(1, -1, 1) * d[fires]),
                           (clamp(dictionary, fires, 5.0), x + (5.0 - acts[:, fires]).view(1, -1, 1) * d[fires])):
        seen = []
        with steer(tiny_model, [edit]):
            with tiny_model.hooks([("blocks.1.hook_resid_pre", lambda a, hook=None: seen.append(a.detach()))]):
                tiny_model(tokens)
        torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        clean = tiny_model(tokens)
        with steer(tiny_model, [ablate(dictionary, silent)]):
            assert torch.equal(tiny_model(tokens), clean)  # ablating a silent feature changes nothing


def test_public_names_stay_callable_after_their_modules_load():
    import sae
    import sae.evals  # noqa: F401 - imports sae.splicing
    import sae.steering  # noqa: F401

    for name in ("splice", "steer", "add", "clamp", "ablate", "add_direction"):
        assert callable(getattr(sae, name)) and not isinstance(getattr(sae, name), type(sae)), name
