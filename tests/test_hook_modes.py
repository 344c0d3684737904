"""Hook blocks nest without switching each other off: random nestings of steer / splice /
capture blocks and run_with_cache calls, at hooks TransformerLens gates behind a mode flag and
at ordinary ones, give the logits of the same edits applied by hand in one flat pass, count
every pass, and leave the mode flags (and the attached hooks) as they found them, whether they
exit normally or by an exception."""

from __future__ import annotations

import random
import re

import pytest
import torch

from sae.base import create
from sae.config import DictionaryConfig
from sae.splicing import capture, splice
from sae.steering import add_direction, steer
from workbench.errors import WorkbenchError

SITES = {  # hook -> the mode TransformerLens fires it only with
    "blocks.0.hook_mlp_in": "use_hook_mlp_in",
    "blocks.1.attn.hook_result": "use_attn_result",
    "blocks.0.hook_q_input": "use_split_qkv_input",
    "blocks.1.hook_attn_in": "use_attn_in",
    "blocks.0.hook_resid_post": None,
    "blocks.2.hook_resid_pre": None,
    "blocks.1.mlp.hook_post": None,
}
GATED = [h for h, mode in SITES.items() if mode]
EXCLUSIVE = {"use_split_qkv_input", "use_attn_in"}
MODES = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")


class Boom(Exception):
    pass


@pytest.fixture(scope="module")
def demo():
    from workbench.models import load_model

    model = load_model("demo")
    gen = torch.Generator().manual_seed(17)
    widths = {h: model.width(h) for h in SITES}
    directions = {h: torch.randn(w, generator=gen) * 2 for h, w in widths.items()}
    dictionaries = {}
    for i, (hook, width) in enumerate(widths.items()):
        d = create(DictionaryConfig(architecture="topk", d_in=width, n_latents=32, k=4), seed=i)
        d.meta = {"hook": hook, "model": "demo"}
        dictionaries[hook] = d.eval()
    return model, model.tokenize("ROMEO:\nBut soft"), directions, dictionaries


def modes(model) -> dict[str, bool]:
    return {mode: bool(getattr(model.bridge.cfg, mode)) for mode in MODES}


def attached(model) -> int:
    points = {id(p): p for p in model.bridge.hook_dict.values()}.values()
    return sum(len(p.fwd_hooks) + len(p.bwd_hooks) for p in points)


def layer(hook: str) -> int:
    return int(re.match(r"blocks\.(\d+)\.", hook).group(1))


def random_block(rng: random.Random, depth: int, kind: str | None = None, hook: str | None = None) -> dict:
    children = []
    for _ in range(rng.randint(1, 2)):
        r = rng.random()
        if depth < 2 and r < 0.5:
            children.append(random_block(rng, depth + 1))
        elif r < 0.8:
            children.append({"kind": "forward"})
        else:
            children.append({"kind": "cache", "hook": rng.choice(list(SITES))})
    return {
        "kind": kind or rng.choice(["steer", "splice", "capture"]),
        "hook": hook or rng.choice(list(SITES)),
        "children": children,
        "raise_at": rng.randrange(len(children) + 1) if rng.random() < 0.3 else None,
    }


def conflicts(hook: str, active: list[tuple[str, str]]) -> bool:
    modes = {SITES[h] for _, h in active} | {SITES[hook]}
    return EXCLUSIVE <= modes


class Runner:
    """Runs a nesting, recording (edits open, logits) per forward and checking flags on every exit."""

    def __init__(self, model, tokens, directions, dictionaries):
        self.model, self.tokens, self.directions, self.dictionaries = model, tokens, directions, dictionaries
        self.active: list[tuple[str, str]] = []  # (steer|splice|capture, hook), outermost first
        self.open_steers: list[dict] = []
        self.forwards: list[tuple[tuple, torch.Tensor]] = []
        self.caches: list[tuple[tuple, str, torch.Tensor]] = []

    def block(self, node: dict) -> None:
        kind, hook, model = node["kind"], node["hook"], self.model
        flags, hooks_before = modes(model), attached(model)
        if conflicts(hook, self.active):  # use_attn_in and use_split_qkv_input exclude each other
            with pytest.raises(WorkbenchError, match="cannot fire together"):
                with self.open(kind, hook):
                    pass
            assert modes(model) == flags and attached(model) == hooks_before
            return
        counter = {"hook": hook, "passes": 0}
        try:
            with self.open(kind, hook) as report:
                self.active.append((kind, hook))
                if kind == "steer":
                    self.open_steers.append(counter)
                try:
                    for i, child in enumerate(node["children"]):
                        if node["raise_at"] == i:
                            raise Boom
                        self.child(child)
                    if node["raise_at"] == len(node["children"]):
                        raise Boom
                finally:
                    self.active.pop()
                    if kind == "steer":
                        self.open_steers.pop()
        except Boom:
            pass
        assert modes(model) == flags, (node, flags)
        assert attached(model) == hooks_before
        if kind == "steer":
            assert report.passes.get(hook, 0) == counter["passes"], (node, str(report))

    def open(self, kind: str, hook: str):
        if kind == "steer":
            return steer(self.model, [add_direction(hook, self.directions[hook])])
        if kind == "splice":
            return splice(self.model, self.dictionaries[hook])
        return self.model.hooks([capture(hook, [])])

    def child(self, node: dict) -> None:
        if node["kind"] == "forward":
            with torch.no_grad():
                self.forwards.append((tuple(self.active), self.model(self.tokens)))
            for counter in self.open_steers:
                counter["passes"] += 1
        elif node["kind"] == "cache":
            hook = node["hook"]
            if conflicts(hook, self.active):
                with pytest.raises(WorkbenchError, match="cannot fire together"):
                    self.model.run_with_cache(self.tokens, [hook])
                return
            self.caches.append(
                (tuple(self.active), hook, self.model.run_with_cache(self.tokens, [hook])[hook])
            )
            for counter in self.open_steers:  # the pass stops after the cached hook's block (the
                steered = counter["hook"]  # next block's input hook still fires)
                counter["passes"] += layer(steered) <= layer(hook) + steered.endswith("hook_resid_pre")
        else:
            self.block(node)


def by_hand(model, tokens, directions, dictionaries, active: tuple, grab: str | None = None):
    """The edits `active` in one flat pass: the bridge's own hooks, the needed flags set by hand."""
    seen = {}
    fns = []
    for kind, hook in active:
        if kind == "steer":
            fns.append((hook, lambda a, hook=None, h=hook: (a.flatten(2) + directions[h]).view(a.shape)))
        elif kind == "splice":

            def rebuild(a, hook=None, d=dictionaries[hook]):
                out = a.clone()
                out[:, 1:] = d(a[:, 1:].reshape(-1, d.d_in)).reshape(a[:, 1:].shape)
                return out

            fns.append((hook, rebuild))
    if grab:
        fns.append((grab, lambda a, hook=None: seen.update(x=a.detach().flatten(2))))  # returns None: no edit
    needed = {SITES[h] for _, h in active if SITES.get(h)} | ({SITES[grab]} - {None} if grab else set())
    bridge = model.bridge
    for mode in needed:
        getattr(bridge, f"set_{mode}")(True)
    try:
        with torch.no_grad(), bridge.hooks(fwd_hooks=fns):
            logits = bridge(tokens, return_type="logits")
    finally:
        for mode in needed:
            getattr(bridge, f"set_{mode}")(False)
    return logits, seen.get("x")


@pytest.mark.parametrize("start", [{}, {"use_attn_result": True}, {"use_attn_in": True}])
def test_random_nestings_equal_the_edits_applied_by_hand_and_restore_the_modes(demo, start):
    model, tokens, directions, dictionaries = demo
    rng = random.Random(f"hook-modes {sorted(start)}")
    for mode, value in start.items():  # flags the user set before: left as they are
        getattr(model.bridge, f"set_{mode}")(value)
    try:
        runner = Runner(model, tokens, directions, dictionaries)
        case = 0  # every gated hook under an outer steer at least once, until 8 passes were checked
        while case < len(GATED) or len(runner.forwards) + len(runner.caches) < 8:
            flags = modes(model)
            runner.block(random_block(rng, 0, "steer", GATED[case % len(GATED)]))
            assert modes(model) == flags == {m: start.get(m, False) for m in MODES}
            case += 1
    finally:
        for mode in start:
            getattr(model.bridge, f"set_{mode}")(False)
    references: dict[tuple, torch.Tensor] = {}
    for active, logits in runner.forwards:
        if active not in references:
            references[active] = by_hand(model, tokens, directions, dictionaries, active)[0]
        torch.testing.assert_close(
            logits, references[active], atol=1e-4, rtol=1e-4, msg=lambda m: f"{active}: {m}"
        )
    for active, hook, x in runner.caches:
        torch.testing.assert_close(
            x,
            by_hand(model, tokens, directions, dictionaries, active, grab=hook)[1],
            atol=1e-4,
            rtol=1e-4,
            msg=lambda m: f"{active} at {hook}: {m}",
        )


def test_a_nested_helper_keeps_the_outer_steer_at_every_gated_hook(demo):
    """The reported case: after a run_with_cache / splice / capture at an ordinary hook inside a
    steer at a gated hook, the next pass is steered exactly like the first, and counted."""
    model, tokens, directions, dictionaries = demo
    with torch.no_grad():
        clean = model(tokens)
        for hook in GATED:
            with steer(model, [add_direction(hook, directions[hook])]) as report:
                first = model(tokens)
                model.run_with_cache(tokens, ["blocks.3.hook_resid_post"])
                with splice(model, dictionaries["blocks.2.hook_resid_pre"], error_term=True):
                    pass
                with model.hooks([capture("blocks.0.hook_resid_post", [])]):
                    pass
                second = model(tokens)
            assert (first - clean).abs().max() > 0.1, hook
            torch.testing.assert_close(second, first, atol=0, rtol=0, msg=hook)
            assert report.passes == {hook: 3}, hook  # model, run_with_cache (it runs the hook's block), model
            assert modes(model) == dict.fromkeys(MODES, False)


def test_hooks_that_cannot_fire_together_are_refused_before_anything_is_attached(demo):
    """`attn.o.hook_out` stops firing when `use_attn_result` is on, and the two attention-input
    modes exclude each other: nesting such hooks is a one-line error, not a silent no-op."""
    model, tokens, directions, _ = demo
    before = attached(model)
    for outer, inner in (
        ("blocks.1.attn.hook_result", "blocks.1.attn.o.hook_out"),
        ("blocks.1.attn.o.hook_out", "blocks.1.attn.hook_result"),
        ("blocks.0.hook_q_input", "blocks.1.hook_attn_in"),
    ):
        direction = torch.zeros(model.width(outer))
        with steer(model, [add_direction(outer, direction)]):
            flags = modes(model)
            with pytest.raises(WorkbenchError, match="cannot fire together") as info:
                model.run_with_cache(tokens, [inner])
            assert "\n" not in str(info.value) and inner in str(info.value)
            assert modes(model) == flags and attached(model) == before + 1
        assert modes(model) == dict.fromkeys(MODES, False) and attached(model) == before
