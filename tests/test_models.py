"""The model adapter on a local HF folder, checked against plain transformers."""

from __future__ import annotations

import pytest
import torch

from workbench.errors import UnknownHookError, UnknownModelError, WorkbenchError
from workbench.models import load_model


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()


def test_logits_match_transformers(tiny_model, hf_model):
    tokens = tiny_model.tokenize(["ROMEO: hold, I say!", "First Citizen:\nBefore we proceed"])
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = tiny_model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_resid_hook_equals_hf_hidden_state(tiny_model, hf_model):
    tokens = tiny_model.tokenize("KING HENRY:\nOnce more unto the breach")
    acts = tiny_model.run_with_cache(tokens, ["blocks.0.hook_resid_post", "blocks.0.hook_resid_pre"])
    with torch.no_grad():
        hidden = hf_model(tokens, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["blocks.0.hook_resid_pre"], hidden[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], hidden[1], atol=1e-5, rtol=1e-5)


def test_stopping_early_changes_nothing(tiny_model):
    tokens = tiny_model.tokenize(["a b c d e f", "to be or not to be"])
    hooks = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"]
    early = tiny_model.run_with_cache(tokens, hooks, stop_early=True)
    full = tiny_model.run_with_cache(tokens, hooks, stop_early=False)
    for hook in hooks:
        assert torch.equal(early[hook], full[hook])


def test_head_hooks_are_flattened_and_widths_known(tiny_model):
    assert tiny_model.width("blocks.1.hook_resid_post") == 64
    assert tiny_model.width("blocks.1.mlp.hook_post") == 256
    assert tiny_model.width("blocks.1.attn.hook_z") == 64  # 4 heads x 16
    tokens = tiny_model.tokenize("hello there")
    z = tiny_model.run_with_cache(tokens, ["blocks.1.attn.hook_z"])["blocks.1.attn.hook_z"]
    assert z.shape == (1, tokens.shape[1], 64)


def test_unknown_hook_lists_close_matches(tiny_model):
    with pytest.raises(UnknownHookError) as info:
        tiny_model.check_hooks(["blocks.1.hook_resid_pots"])
    message = str(info.value)
    assert "\n" not in message
    assert "blocks.1.hook_resid_post" in message


def test_hooks_context_edits_and_is_always_removed(tiny_model):
    tokens = tiny_model.tokenize("what light through yonder window")
    clean = tiny_model(tokens)

    def zero(activation, hook):
        return torch.zeros_like(activation)

    with tiny_model.hooks([("blocks.0.hook_resid_post", zero)]):
        edited = tiny_model(tokens)
    assert not torch.allclose(edited, clean)
    with pytest.raises(RuntimeError):
        with tiny_model.hooks([("blocks.0.hook_resid_post", zero)]):
            raise RuntimeError("boom")
    torch.testing.assert_close(tiny_model(tokens), clean, atol=0, rtol=0)


def test_generate_is_greedy_decoding_with_kv_cache(tiny_model, hf_model):
    prompt = "ROMEO:"
    text = tiny_model.generate(prompt, max_new_tokens=12)
    tokens = tiny_model.tokenize(prompt)
    for _ in range(12):  # reference: full recomputation, argmax each step
        with torch.no_grad():
            next_token = tiny_model(tokens)[0, -1].argmax()
        tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    assert text == tiny_model.tokenizer.decode(tokens[0, 1:])
    with torch.no_grad():
        out = hf_model.generate(
            tiny_model.tokenize(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    assert torch.equal(out, tokens)


def test_unembed_is_the_lm_head(tiny_model, hf_model):
    torch.testing.assert_close(tiny_model.unembed, hf_model.lm_head.weight.T.detach())


def test_hub_name_offline_gives_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownModelError) as info:
        load_model("gpt2-surely-not-cached-here")
    assert "\n" not in str(info.value) and "gpt2-surely-not-cached-here" in str(info.value)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WorkbenchError):
        load_model(str(tmp_path))


@pytest.mark.parametrize("spec", ["/no/such/model-folder", "./no-such-model", "~/no-such-model"])
def test_a_missing_model_folder_says_so_in_one_line(spec):
    """A path that does not exist is a missing folder, not a hub name (which said 'is the hub
    reachable? ... Repo id must be in the form ...')."""
    with pytest.raises(UnknownModelError, match="no such folder") as info:
        load_model(spec)
    assert "hub" not in str(info.value) and len(str(info.value).splitlines()) == 1
