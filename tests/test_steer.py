"""Steering edits every forward pass: KV-cached generation equals full recomputation, steered."""

from __future__ import annotations

import torch

from sae.steer import add, generate_pair, steer
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
