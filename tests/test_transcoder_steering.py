"""`sae.steer` edits transcoder features: a clamp reads the feature's activation a_f at the
transcoder's input hook and adds (v − a_f)·W_dec[f] at its output hook on the same pass, so an
ablation removes exactly the feature's decoder contribution; `add` adds s·W_dec[f] there. Checked
against the same edit written by hand with plain hooks, per position, in KV-cached generation,
with gated hooks and inside other hook blocks; bad transcoders are one-line errors."""

from __future__ import annotations

import pytest
import torch

from sae.base import DictionaryError, create
from sae.config import DictionaryConfig
from sae.steering import ablate, add, add_direction, clamp, steer
from workbench.errors import UnknownHookError, WorkbenchError

IN, OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
MLP_IN = "blocks.0.hook_mlp_in"  # gated: fires only with use_hook_mlp_in on
MODES = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")
PROMPT = "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?"


def transcoder(d_in=64, d_out=64, hook=IN, out_hook=OUT, model=None, seed=0):
    """A random TopK transcoder (32 latents, k 4) with a skip connection, reading `hook` and
    writing `out_hook`."""
    t = create(
        DictionaryConfig(architecture="topk", d_in=d_in, n_latents=32, k=4, d_out=d_out, skip=True), seed=seed
    )
    with torch.no_grad():
        t.W_dec.mul_(3.0)  # an edit that moves the logits clearly
        t.W_skip.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    t.meta = {"hook": hook, "out_hook": out_hook, **({"model": model} if model else {})}
    return t.eval()


def by_hand(model, tokens, t, feature, where=None, read=IN, before=None):
    """Logits with a_f·W_dec[f] subtracted at OUT, a_f computed by hand from the `read` hook's
    activation (plus `before` [d], added there first) on the same pass; `where`: positions."""
    seen = {}

    def read_fn(a, hook=None):
        if before is not None:
            a = a + before
        seen["a"] = t.encode(a.flatten(0, 1)).to_dense()[:, feature].view(a.shape[:2])
        return a

    def write_fn(a, hook=None):
        change = seen.pop("a").unsqueeze(-1) * t.W_dec[feature]
        if where is not None:
            change = change * where.view(1, -1, 1)
        return a - change

    with torch.no_grad(), model.hooks([(read, read_fn), (OUT, write_fn)]):
        return model(tokens)


def activations(model, tokens, t, read=IN):
    x = model.run_with_cache(tokens, [read])[read]
    with torch.no_grad():
        return t.encode(x[0]).to_dense()  # [P, n_latents]


@pytest.fixture(scope="module")
def setup(tiny_model):
    tokens = tiny_model.tokenize(PROMPT)
    t = transcoder()
    acts = activations(tiny_model, tokens, t)
    feature = int((acts > 0).sum(0).argmax())  # fires on several tokens
    assert (acts[:, feature] > 0).sum() >= 3
    with torch.no_grad():
        clean = tiny_model(tokens)
    return tiny_model, tokens, t, acts, feature, clean


def steered(model, tokens, edits, positions="all"):
    with torch.no_grad(), steer(model, edits, positions) as report:
        logits = model(tokens)
    return logits, report


def test_ablate_removes_exactly_the_features_decoder_contribution(setup):
    model, tokens, t, acts, feature, clean = setup
    logits, report = steered(model, tokens, [ablate(t, feature)])
    torch.testing.assert_close(logits, by_hand(model, tokens, t, feature), atol=1e-5, rtol=1e-5)
    assert (logits - clean).abs().max() > 0.05  # the edit did something
    assert report.passes == {OUT: 1} and report.positions_edited == {OUT: tokens.shape[1]}
    # the activation is read after the edits at the input hook: the MLP's input, as edited
    u = torch.randn(64, generator=torch.Generator().manual_seed(3))
    both, _ = steered(model, tokens, [add_direction(IN, u), ablate(t, feature)])
    torch.testing.assert_close(both, by_hand(model, tokens, t, feature, before=u), atol=1e-5, rtol=1e-5)


def test_add_adds_the_decoder_row_at_the_output_hook(setup):
    model, tokens, t, _, feature, _ = setup
    with torch.no_grad():
        plain = model.run_with_cache(tokens, [OUT])[OUT]
    seen = []
    with torch.no_grad(), steer(model, [add(t, feature, 2.5)]):
        with model.hooks([(OUT, lambda a, hook=None: seen.append(a.detach()))]):
            model(tokens)
    torch.testing.assert_close(seen[0], plain + 2.5 * t.W_dec[feature].detach(), atol=1e-5, rtol=1e-5)


def test_clamp_to_its_own_value_and_ablating_a_silent_feature_change_nothing(setup):
    model, tokens, t, acts, feature, clean = setup
    p = int(acts[:, feature].argmax())
    silent = int((acts > 0).sum(0).argmin())
    assert (acts[:, silent] == 0).all()
    for edit in (clamp(t, feature, float(acts[p, feature]), positions=[p]), ablate(t, silent)):
        logits, _ = steered(model, tokens, [edit])
        assert torch.equal(logits, clean), edit.label
    moved, _ = steered(model, tokens, [clamp(t, feature, float(acts[p, feature]) + 4.0, positions=[p])])
    assert (moved - clean).abs().max() > 0.05


def test_positions_choose_where_the_feature_is_ablated(setup):
    model, tokens, t, acts, feature, clean = setup
    p = int(acts[:, feature].argmax())
    only = torch.arange(tokens.shape[1]) == p
    expected = by_hand(model, tokens, t, feature, where=only)
    per_edit, report = steered(model, tokens, [ablate(t, feature, positions=[p])])
    per_block, _ = steered(model, tokens, [ablate(t, feature)], positions=only)
    for logits in (per_edit, per_block):
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(logits[:, :p], clean[:, :p]) and (logits[:, p] - clean[:, p]).abs().max() > 1e-3
    assert report.positions_edited == {OUT: 1} and f"at [{p}]" in str(report)
    # an edit's own positions override the block's; the others follow the block
    q = int(acts[:, feature].nonzero()[0])
    other = torch.arange(tokens.shape[1]) == q
    mixed, report = steered(
        model, tokens, [ablate(t, feature, positions=[p]), add(t, feature, 0.0)], positions=other
    )
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=1e-5)
    assert report.positions_edited == {OUT: len({p, q})}
    with pytest.raises(DictionaryError, match="non-negative token positions"):
        ablate(t, feature, positions=[-1])


def test_kv_cached_generation_is_ablated_on_every_generated_token(setup):
    model, _, t, _, feature, _ = setup
    prompt = "ROMEO:\nBut soft"
    n_prompt = model.tokenize(prompt).shape[1]
    edits = [ablate(t, feature), add(t, (feature + 1) % 32, 6.0)]
    with torch.no_grad(), steer(model, edits, positions="generated") as report:
        text = model.generate(prompt, max_new_tokens=8)
    assert text != model.generate(prompt, max_new_tokens=8)
    tokens = model.tokenize(text)
    mask = torch.arange(tokens.shape[1]) >= n_prompt
    logits, _ = steered(model, tokens, edits, positions=mask)  # one full pass, steered the same way
    assert torch.equal(logits[0, n_prompt - 1 : -1].argmax(-1), tokens[0, n_prompt:])
    assert report.passes == {OUT: 8} and report.positions_edited == {OUT: 7}


def test_a_gated_input_hook_is_switched_on_and_nested_blocks_keep_it(tiny_model):
    """A transcoder reading `hook_mlp_in` (fired only with use_hook_mlp_in on): the steer block
    switches the mode on for its reading hook, a nested run_with_cache and steer keep it, and
    every flag is back off on exit."""
    model = tiny_model
    tokens = model.tokenize(PROMPT)
    t = transcoder(hook=MLP_IN, seed=1)
    acts = activations(model, tokens, t, read=MLP_IN)
    feature = int((acts > 0).sum(0).argmax())
    expected = by_hand(model, tokens, t, feature, read=MLP_IN)
    with torch.no_grad(), steer(model, [ablate(t, feature)]) as report:
        first = model(tokens)
        model.run_with_cache(tokens, ["blocks.1.hook_resid_post"])
        with steer(model, [add_direction("blocks.1.hook_resid_pre", torch.zeros(64))]):
            inner = model(tokens)
        last = model(tokens)
    for logits in (first, inner, last):
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert report.passes == {OUT: 4}
    assert {m: bool(getattr(model.bridge.cfg, m)) for m in MODES} == dict.fromkeys(MODES, False)


def attached(model) -> int:
    points = {id(p): p for p in model.bridge.hook_dict.values()}.values()
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in points)


@pytest.mark.parametrize(
    "make, error, expected",
    [
        (lambda: ablate(transcoder(model="gpt2"), 1), DictionaryError, "trained on model 'gpt2'"),
        (lambda: ablate(transcoder(d_in=32), 1), DictionaryError, "has d_in=32, hook blocks.0.ln2"),
        (
            lambda: add(transcoder(d_out=48), 1, 1.0),
            DictionaryError,
            "has d_out=48, hook blocks.0.hook_mlp_out",
        ),
        (lambda: ablate(transcoder(hook="blocks.0.ln2.hook_nope"), 1), UnknownHookError, "hook_nope"),
        (lambda: clamp(transcoder(out_hook="blocks.9.hook_mlp_out"), 1, 2.0), UnknownHookError, "blocks.9"),
        (
            lambda: ablate(transcoder(), 1, hook="blocks.1.hook_mlp_out"),
            DictionaryError,
            "trained to write blocks.0.hook_mlp_out, not blocks.1.hook_mlp_out",
        ),
    ],
    ids=["model", "d_in", "d_out", "in hook", "out hook", "other out hook"],
)
def test_a_transcoder_that_cannot_run_here_is_a_one_line_error_before_any_pass(
    tiny_model, make, error, expected
):
    model = tiny_model
    passes, before = [], attached(model)
    with model.hooks([("hook_embed", lambda a, hook=None: passes.append(1))]):
        with pytest.raises(error) as info:
            with steer(model, [make()]):
                model(model.tokenize("ROMEO:"))
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, WorkbenchError) and passes == [] and attached(model) == before
    with pytest.raises(DictionaryError, match="does not record its output hook"):
        ablate(transcoder(out_hook=None), 1)


def test_a_transcoder_held_on_the_cpu_steers_a_model_on_its_device_and_in_bfloat16(
    tiny_model, tiny_model_dir, setup, device
):
    """The edits move to the model's device (the caller's transcoder stays on the CPU); a
    bfloat16 model reads the feature in the transcoder's float32 and gets its edit in bfloat16."""
    from workbench.models import load_model

    _, tokens, t, acts, feature, clean = setup
    expected = by_hand(tiny_model, tokens, t, feature)
    assert (expected - clean).abs().max() > 0.5  # the ablation moves the logits well past the tolerance
    for dtype in ("float32", "bfloat16"):
        model = (
            tiny_model
            if (device, dtype) == ("cpu", "float32")
            else load_model(str(tiny_model_dir), device=device, dtype=dtype)
        )
        seen = []
        grab = ("blocks.1.hook_resid_pre", lambda a, hook=None: seen.append(a.dtype))
        with torch.no_grad(), steer(model, [ablate(t, feature), add(t, 3, 1.0, positions=[2])]) as report:
            with model.hooks([grab]):
                logits = model(tokens)
        assert t.W_dec.device.type == "cpu" and logits.device.type == device
        assert seen == [getattr(torch, dtype)] and report.positions_edited == {OUT: tokens.shape[1]}
        with torch.no_grad(), steer(model, [ablate(t, feature)]):
            ablated = model(tokens).float().cpu()
        tolerance = 1e-3 if dtype == "float32" else 0.05  # bfloat16's rounding, ~0.01 on these logits
        torch.testing.assert_close(ablated, expected, atol=tolerance, rtol=0)
