"""The bridge's hook modes, switched per hook block and put back exactly as found.

TransformerLens fires some hooks (per-head results, split q/k/v inputs, attn_in, mlp_in) only
with a cfg flag on (`use_attn_result`, `use_split_qkv_input`, `use_attn_in`, `use_hook_mlp_in`),
and some ordinary hooks only with one off (`attn.o.hook_out` with `use_attn_result` off,
`attn.q.hook_in` with both attention-input modes off). Hook blocks nest: a steer at
`hook_mlp_in` stays open while a helper captures at another hook. So every block goes through
`HookModes.scope`: it switches on the modes its hooks need without switching off those an
enclosing block needs, refuses (one line, before anything is attached) a hook that cannot fire
together with the open ones, and on exit, normal or by an exception, puts every flag back as
it found it. This module speaks to the bridge object it is given and imports no
transformer_lens.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from workbench.errors import WorkbenchError

MODES = ("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in", "use_attn_in")
EXCLUSIVE = frozenset({"use_attn_in", "use_split_qkv_input"})
"""TransformerLens refuses to have both on."""


@dataclass
class Needs:
    """What one block's hooks need of the modes: {mode: a hook that needs it}."""

    on: dict[str, str] = field(default_factory=dict)
    off: dict[str, str] = field(default_factory=dict)


class HookModes:
    """The mode flags of one bridge and the blocks open on it (innermost last)."""

    def __init__(self, bridge) -> None:
        self.bridge = bridge
        self.fires_only_without: dict[str, set[str]] = {}
        """hook -> modes under which it does not fire (filled by the model's probe)."""
        self._open: list[Needs] = []

    def gate(self, hook: str) -> str | None:
        """The mode `hook` fires only with, whatever the flags are now."""
        # The bridge's `_gated_hook_reason` answers only for flags that are off at the moment
        # (asked while a mode was on, it called the hook ungated and the mode was switched off
        # under an open block), so ask it about a configuration with every flag off.
        all_off = types.SimpleNamespace(cfg=types.SimpleNamespace(**dict.fromkeys(MODES, False)))
        return type(self.bridge)._gated_hook_reason(all_off, hook)

    def flags(self) -> dict[str, bool]:
        """The current value of every mode flag."""
        return {mode: bool(getattr(self.bridge.cfg, mode, False)) for mode in MODES}

    def needs(self, hooks: Iterable[str]) -> Needs:
        """The modes `hooks` need on and off; raises WorkbenchError if they cannot fire in one pass."""
        needs = Needs()
        for hook in hooks:
            if (mode := self.gate(hook)) is not None:
                needs.on.setdefault(mode, hook)
            for mode in sorted(self.fires_only_without.get(hook, ())):
                needs.off.setdefault(mode, hook)
        _refuse_conflicts(needs, "in one pass")
        return needs

    @contextlib.contextmanager
    def scope(self, needs: Needs) -> Iterator[None]:
        """Hold `needs` (and those of the blocks already open) for the block; restore on exit."""
        outer = self._combined()
        for mode, hook in needs.on.items():
            outer.on.setdefault(mode, hook)
        for mode, hook in needs.off.items():
            outer.off.setdefault(mode, hook)
        _refuse_conflicts(outer, "in nested blocks")
        found = self.flags()
        self._open.append(needs)
        try:
            self._apply(found, self._combined())
            yield
        finally:
            del self._open[next(i for i, n in enumerate(self._open) if n is needs)]
            self._apply(found, self._combined())  # as found, unless a block still open needs otherwise

    def _combined(self) -> Needs:
        combined = Needs()
        for needs in self._open:
            for mode, hook in needs.on.items():
                combined.on.setdefault(mode, hook)
            for mode, hook in needs.off.items():
                combined.off.setdefault(mode, hook)
        return combined

    def _apply(self, base: dict[str, bool], needs: Needs) -> None:
        target = {mode: (value or mode in needs.on) and mode not in needs.off for mode, value in base.items()}
        if all(target[m] for m in EXCLUSIVE):  # one was on before; keep the one that is needed
            for mode in EXCLUSIVE - needs.on.keys():
                target[mode] = False
        now = self.flags()
        for mode in sorted(MODES, key=lambda m: target[m]):  # switch off before switching on
            if now[mode] != target[mode]:
                getattr(self.bridge, f"set_{mode}")(target[mode])


def _refuse_conflicts(needs: Needs, where: str) -> None:
    for mode, hook in needs.on.items():
        if mode in needs.off:
            other = needs.off[mode]
            raise WorkbenchError(
                f"hooks {hook} and {other} cannot fire together {where} "
                f"(TransformerLens fires {hook} only with {mode} on, {other} only with it off)"
            )
    if EXCLUSIVE <= needs.on.keys():
        a, b = (needs.on[m] for m in sorted(EXCLUSIVE))
        raise WorkbenchError(
            f"hooks {a} and {b} cannot fire together {where} "
            f"(TransformerLens: {' and '.join(sorted(EXCLUSIVE))} exclude each other)"
        )
