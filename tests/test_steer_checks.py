"""Steering and splicing edits are checked on entry, before any forward pass: the hook fires and
holds per-token activations, widths agree, the feature is the dictionary's, the strength is
finite, the dictionary was trained at that hook of that model. A refusal is one line and leaves
no hook attached and every hook mode as it was."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae.base import DictionaryError, create
from sae.config import DictionaryConfig
from sae.dose_response import sweep
from sae.splicing import replace_activation, splice
from sae.steering import ablate, add, add_direction, clamp, code_off, code_on, steer
from workbench.errors import UnknownHookError, WorkbenchError
from workbench.model_sources import resolve

RESID = "blocks.0.hook_resid_post"
MLP_IN = "blocks.0.hook_mlp_in"  # gated: fires only with use_hook_mlp_in on
MODES = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")


def dictionary(
    arch: str = "topk", d_in: int = 256, hook: str = RESID, model: str = "demo", n_latents: int = 16
):
    d = create(DictionaryConfig(architecture=arch, d_in=d_in, n_latents=n_latents, k=2))
    d.meta = {"hook": hook, "model": model}
    return d.eval()


@pytest.fixture(scope="module")
def demo():
    from workbench.models import load_model

    model = load_model("demo")
    return model, model.tokenize("ROMEO:\nBut soft")


def state(model) -> tuple:
    points = {id(p): p for p in model.bridge.hook_dict.values()}.values()
    attached = sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in points)
    return attached, {mode: bool(getattr(model.bridge.cfg, mode)) for mode in MODES}


def refused(model, run, error=DictionaryError) -> str:
    """The one-line message `run()` is refused with, having checked that no forward pass ran
    (a hook on the embedding counts them) and that nothing was left attached or switched."""
    passes = []
    with model.hooks([("hook_embed", lambda a, hook=None: passes.append(1))]):
        before = state(model)
        with pytest.raises(error) as info:
            run()
        assert passes == [] and state(model) == before
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, WorkbenchError)
    return message


def one_pass(model, tokens, block):
    """A run of one forward pass inside `block()`."""

    def run():
        with block():
            model(tokens)

    return run


CASES = {  # name: (edits, error, expected message)
    "direction width": (
        lambda: [add_direction(RESID, torch.randn(7))],
        DictionaryError,
        "direction has 7 dims, hook blocks.0.hook_resid_post has d=256",
    ),
    "direction width at a gated hook": (
        lambda: [add_direction(MLP_IN, torch.randn(7))],
        DictionaryError,
        "direction has 7 dims, hook blocks.0.hook_mlp_in has d=256",
    ),
    "direction not a vector": (
        lambda: [add_direction(RESID, torch.randn(2, 128))],
        DictionaryError,
        "direction has shape (2, 128), hook blocks.0.hook_resid_post needs [256]",
    ),
    "hook without per-token activations": (
        lambda: [add_direction("blocks.0.attn.hook_pattern", torch.randn(256))],
        UnknownHookError,
        "does not hold per-token activations",
    ),
    "strength NaN": (
        lambda: [add(dictionary(), 3, float("nan"))],
        DictionaryError,
        "feature 3 x nan: strength nan is not finite",
    ),
    "strength infinite": (
        lambda: [add_direction(RESID, torch.randn(256), float("inf"))],
        DictionaryError,
        "direction: strength inf is not finite",
    ),
    "direction NaN": (
        lambda: [add_direction(RESID, torch.full((256,), float("nan")))],
        DictionaryError,
        "direction at hook blocks.0.hook_resid_post has NaN or infinite entries",
    ),
    "clamped feature out of range": (
        lambda: [dataclasses.replace(clamp(dictionary(), 3, 1.0), feature=16)],
        DictionaryError,
        "feature 16 is outside 0..15",
    ),
    "dictionary width": (
        lambda: [ablate(dictionary(d_in=64), 3)],
        DictionaryError,
        "feature 3 = 0: the dictionary has d_in=64, hook blocks.0.hook_resid_post has d=256",
    ),
    "dictionary of another hook": (
        lambda: [add(dictionary(hook="blocks.1.hook_resid_post"), 3, 1.0, hook=RESID)],
        DictionaryError,
        "feature 3 x 1: the dictionary was trained at hook "
        "blocks.1.hook_resid_post, not blocks.0.hook_resid_post",
    ),
    "dictionary of another model": (
        lambda: [clamp(dictionary(model="gpt2"), 3, 2.0)],
        DictionaryError,
        "feature 3 = 2: the dictionary was trained on model 'gpt2', not 'demo'",
    ),
    "codebook of another hook": (
        lambda: [code_off(dictionary("codebook", hook="blocks.1.hook_resid_post"), 1, RESID)],
        DictionaryError,
        "code 1 off: the dictionary was trained at hook blocks.1",
    ),
    "codebook code out of range": (
        lambda: [dataclasses.replace(code_on(dictionary("codebook"), 1), feature=-1)],
        DictionaryError,
        "feature -1 is outside 0..15",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_steer_refuses_a_bad_edit_before_any_pass(demo, case):
    model, tokens = demo
    edits, error, expected = CASES[case]
    message = refused(model, one_pass(model, tokens, lambda: steer(model, edits())), error)
    assert expected in message


def test_good_edits_pass_the_checks_however_the_model_is_named(demo):
    """The demo model by spec or by folder, a hub alias of the same name, a peer's hook name that
    is no hook of this model (not compared), a dictionary that records nothing."""
    model, tokens = demo
    folder = resolve("demo").name_or_path
    for d in (
        dictionary(),
        dictionary(model=folder),
        dictionary(hook="layers.0", model=""),
        dictionary(model=None),
    ):
        with (
            torch.no_grad(),
            steer(model, [add(d, 3, 1.0, hook=RESID), code_on(dictionary("codebook"), 2)]) as report,
        ):
            model(tokens)
        assert report.passes == {RESID: 1}
    assert model.names_this_model("demo") and model.names_this_model(folder)
    assert not model.names_this_model("gpt2")


def test_splice_and_replace_activation_check_before_any_pass(demo):
    model, tokens = demo
    for block, expected in (
        (
            lambda: splice(model, dictionary(hook="blocks.1.hook_resid_post"), RESID),
            "splice at blocks.0.hook_resid_post: the dictionary was trained at hook "
            "blocks.1.hook_resid_post, not blocks.0.hook_resid_post",
        ),
        (
            lambda: splice(model, dictionary(model="gpt2")),
            "the dictionary was trained on model 'gpt2', not 'demo'",
        ),
        (
            lambda: splice(model, dictionary(d_in=64)),
            "the dictionary has d_in=64, hook blocks.0.hook_resid_post has d=256",
        ),
        (
            lambda: replace_activation(model, MLP_IN, torch.zeros(7)),
            "replacement value has shape (7,), hook blocks.0.hook_mlp_in has d=256",
        ),
    ):
        assert expected in refused(model, one_pass(model, tokens, block))


def test_sweep_checks_the_edit_at_every_strength_before_any_pass(demo):
    model, _ = demo

    def sweeping(edit, strengths):
        return lambda: sweep(
            model, edit, strengths, ["ROMEO:"], concept=[5], neutral_text="But soft", max_new_tokens=2
        )

    assert "strength inf is not finite" in refused(
        model, sweeping(add(dictionary(), 3, 0.0), [0.0, 1.0, float("inf")])
    )
    assert "direction has 7 dims" in refused(model, sweeping(add_direction(RESID, torch.randn(7)), [1.0]))
    assert "trained at hook blocks.1" in refused(
        model, sweeping(add(dictionary(hook="blocks.1.hook_resid_post"), 3, 0.0, hook=RESID), [1.0])
    )
