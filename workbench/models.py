"""The model adapter: the only module that imports transformer_lens.

`load_model(spec)` boots a TransformerLens 4 `TransformerBridge` (raw HF weights, so hook
activations equal the HF model's hidden states) and wraps it in `Model`, a small surface the
rest of the project speaks: token windows in, activations at named hooks out, hooks scoped by
context managers. Activations at hooks with a head axis (`hook_z`, `hook_q`, ...) are flattened
to [batch, pos, n_heads * d_head].
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.devices import model_dtype, resolve_device
from workbench.errors import UnknownHookError, UnknownModelError, WorkbenchError
from workbench.hook_modes import MODES, HookModes, Needs
from workbench.model_sources import BUILTIN_MODELS, ModelSource, resolve

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_NOT_PER_TOKEN = ("hook_pattern", "hook_attn_scores")  # [batch, head, query, key]


@dataclass
class Model:
    """A TransformerBridge plus what the project needs to know about it."""

    source: ModelSource
    bridge: object = field(repr=False)
    _dims: dict[str, int] = field(default_factory=dict, repr=False)
    _other_hooks: set[str] = field(default_factory=set, repr=False)
    """Hooks that fire but hold no per-token activations (token ids, attention patterns)."""
    _modes: HookModes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._modes = HookModes(self.bridge)

    # --- identity -------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return self.source.spec

    def names_this_model(self, spec: str) -> bool:
        """Whether `spec`, as a dictionary records it, names this model: the same spec, or the same
        folder or hub name up to its parent folders or organisation, case and TransformerLens
        aliases ("gpt2-small", "openai-community/gpt2" and "gpt2" are one model)."""
        return spec == self.spec or _model_name(spec) in {
            _model_name(self.spec),
            _model_name(self.source.name_or_path),
        }

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (and where its activations and logits come out)."""
        return _first_device(self.bridge)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's forward (`--model-dtype`)."""
        return next(self.bridge.parameters()).dtype

    @property
    def tokenizer(self):
        return self.bridge.tokenizer

    @property
    def n_ctx(self) -> int:
        return int(self.bridge.cfg.n_ctx)

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    @property
    def d_vocab(self) -> int:
        return int(self.bridge.cfg.d_vocab)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.bridge.cfg.d_model)

    @property
    def default_hook(self) -> str:
        """The residual stream after the middle block: the usual place to train a dictionary."""
        return f"blocks.{max(0, self.n_layers // 2 - 1)}.hook_resid_post"

    @property
    def bos_token_id(self) -> int:
        """The token that starts every window (CLS for BERT-style encoders)."""
        tok = self.tokenizer
        if not self.source.causal and tok.cls_token_id is not None:
            return int(tok.cls_token_id)
        for candidate in (tok.bos_token_id, tok.eos_token_id):
            if candidate is not None:
                return int(candidate)
        raise WorkbenchError(f"model {self.spec!r}: its tokenizer has no BOS/EOS token")

    @property
    def separator_token_ids(self) -> list[int]:
        """Tokens put between documents of a corpus (end-of-text; [SEP] for encoders)."""
        tok = self.tokenizer
        sep = tok.sep_token_id if not self.source.causal else tok.eos_token_id
        return [] if sep is None else [int(sep)]

    # --- hooks ----------------------------------------------------------------------------
    @property
    def hook_names(self) -> list[str]:
        """Every hook that fires on a forward pass (TransformerLens also lists some that never do)."""
        return sorted(self.hook_widths())

    def check_hooks(self, hooks: Sequence[str]) -> None:
        """Raise UnknownHookError, naming close matches, for the first hook that does not fire."""
        widths = self.hook_widths()
        for hook in hooks:
            if hook not in widths and hook not in self._other_hooks:
                known = [*widths, *self._other_hooks]
                close = difflib.get_close_matches(hook, sorted(known), n=4, cutoff=0.6)
                hint = (
                    f"; close matches: {', '.join(close)}"
                    if close
                    else "; see `workbench models --model ...`"
                )
                what = (
                    "never fires for this architecture" if hook in self.bridge.hook_dict else "does not exist"
                )
                raise UnknownHookError(f"model {self.spec!r}: hook {hook!r} {what}{hint}")

    def width(self, hook: str) -> int:
        """Width of the (flattened) activation at `hook`."""
        self.check_hooks([hook])
        if hook not in self._dims:
            raise UnknownHookError(f"hook {hook!r} does not hold per-token activations [batch, pos, ...]")
        return self._dims[hook]

    def hook_widths(self) -> dict[str, int]:
        """Width of every hook that fires, probed once with a 2-token input (gated hooks too).
        The probe also records which ordinary hooks stop firing under a mode (see hook_modes)."""
        if not self._dims:
            probe = torch.full((1, 2), self.bos_token_id, dtype=torch.long)
            gates = {h: self._modes.gate(h) for h in self.bridge.hook_dict}
            plain = [h for h, gate in gates.items() if gate is None]
            every_mode_off = Needs(off=dict.fromkeys(MODES, "the probe"))
            plain_shapes = self._capture(probe, plain, None, shapes_only=True, needs=every_mode_off)
            self._record_widths(plain_shapes)
            for gate in sorted({g for g in gates.values() if g is not None}):
                only = Needs(on={gate: "the probe"}, off={m: "the probe" for m in MODES if m != gate})
                group = [h for h, g in gates.items() if g == gate]
                try:
                    shapes = self._capture(probe, [*group, *plain], None, shapes_only=True, needs=only)
                except NotImplementedError:  # this architecture cannot provide the gated hooks
                    continue
                self._record_widths({h: shapes[h] for h in group if h in shapes})
                for hook, shape in plain_shapes.items():
                    if shapes.get(hook) != shape:
                        self._modes.fires_only_without.setdefault(hook, set()).add(gate)
        return self._dims

    def mlp_hooks(self, layer: int) -> tuple[str, str]:
        """(in_hook, out_hook) of block `layer`'s MLP: what a transcoder of that layer reads and
        writes (issue 22). Raises WorkbenchError for a layer the model lacks.

        - Pre-norm decoders (GPT-2, the demo, Llama, Gemma): in = `blocks.L.ln2.hook_normalized`,
          the residual normalised by the MLP's norm *before* that norm's weight and bias (on
          TransformerBridge this hook is (x - mean) / sigma for LayerNorm, x / rms for RMSNorm;
          measured on the demo: LN output - hook_normalized up to 0.28, and on Gemma-3 the
          weight is 1 + w). As in SAELens/circuit-tracer transcoders of fold_ln models; the map
          in -> out is then the norm's fixed elementwise affine followed by the MLP, and with
          the norm's scale frozen (attribution graphs) `in` is affine in the residual.
        - out = `blocks.L.hook_mlp_out`, the MLP's write to the residual, except where a norm
          follows the MLP (Gemma-2/3's post_feedforward_layernorm, whose scale depends on the
          MLP's output): there `blocks.L.mlp.hook_out`, the MLP module's own output.
        - Encoders (MiniLM: the norm comes after the MLP): the MLP module's own hooks,
          `blocks.L.mlp.hook_in` -> `blocks.L.mlp.hook_out`."""
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise WorkbenchError(
                f"model {self.spec!r} has layers 0..{self.n_layers - 1}; no MLP at layer {layer!r}"
            )
        block = self.bridge.blocks[layer]
        if not self.source.causal or not hasattr(block, "ln2"):
            return f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.mlp.hook_out"
        post_norm = hasattr(block, "ln2_post")
        return (
            f"blocks.{layer}.ln2.hook_normalized",
            f"blocks.{layer}.mlp.hook_out" if post_norm else f"blocks.{layer}.hook_mlp_out",
        )

    def _record_widths(self, shapes: dict[str, tuple]) -> None:
        for hook, shape in shapes.items():
            if len(shape) < 3 or hook.endswith(_NOT_PER_TOKEN):
                self._other_hooks.add(hook)
            else:
                self._dims[hook] = math.prod(shape[2:])

    @contextlib.contextmanager
    def hooks(
        self, fwd_hooks: Sequence[tuple[str, Callable]] = (), bwd_hooks: Sequence = ()
    ) -> Iterator["Model"]:
        """Attach hooks `(name, fn(activation, hook) -> activation | None)` for the block; always
        removed, and the hook modes put back as found. Raises UnknownHookError for a hook that
        does not fire, WorkbenchError for hooks that cannot fire together with those of the
        blocks already open (both before anything is attached)."""
        self.check_hooks([name for name, _ in [*fwd_hooks, *bwd_hooks] if isinstance(name, str)])
        with self._bridge_hooks(fwd_hooks, bwd_hooks):
            yield self

    @contextlib.contextmanager
    def _bridge_hooks(self, fwd_hooks: Sequence = (), bwd_hooks: Sequence = (), needs: Needs | None = None):
        """Some hooks (per-head results, split q/k/v inputs, attn_in, mlp_in) cost extra compute,
        so TransformerLens fires them only with a mode on; the scope switches on what these hooks
        need, keeps what enclosing blocks need, and restores every flag on exit."""
        if needs is None:
            needs = self._modes.needs([name for name, _ in [*fwd_hooks, *bwd_hooks] if isinstance(name, str)])
        with (
            self._modes.scope(needs),
            self.bridge.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks)),
        ):
            yield

    # --- running --------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str], prepend_bos: bool = True) -> Int[Tensor, "batch pos"]:
        """Token ids, padded on the right, BOS (CLS) first unless `prepend_bos` is False."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not self.source.causal:
            return self.bridge.to_tokens(texts)
        return self.bridge.to_tokens(texts, prepend_bos=prepend_bos, padding_side="right")

    def to_string(self, tokens: Tensor) -> str | list[str]:
        return self.bridge.to_string(tokens)

    def to_str_tokens(self, tokens: Tensor) -> list[str]:
        return [self.tokenizer.decode([int(t)]) for t in tokens.reshape(-1)]

    def __call__(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        """Logits on the model's device; `tokens` may be on any device."""
        tokens = tokens.to(self.device)
        return self.bridge(tokens, return_type="logits", attention_mask=self._padding_mask(tokens))

    def _padding_mask(self, tokens: Tensor) -> Tensor | None:
        """Encoders see padding in both directions, so mask it; causal models (right-padded, and
        whose pad id is often a real token) need no mask for the real positions."""
        pad = self.tokenizer.pad_token_id
        if self.source.causal or pad is None:
            return None
        return (tokens != pad).long()

    def run_with_cache(
        self, tokens: Int[Tensor, "batch pos"], hooks: Sequence[str], stop_early: bool = True
    ) -> dict[str, Float[Tensor, "batch pos d"]]:
        """Activations at `hooks` in one forward pass, stopping after the last block needed."""
        for hook in hooks:
            self.width(hook)  # refuses unknown hooks and those without per-token activations
        stop = _stop_layer(hooks, self.n_layers) if stop_early else None
        captured = self._capture(tokens, hooks, stop)
        if missing := [h for h in hooks if h not in captured]:
            raise UnknownHookError(
                f"model {self.spec!r}: hook {missing[0]!r} does not fire together with "
                f"{', '.join(h for h in hooks if h in captured)}"
            )
        return captured

    def _capture(
        self,
        tokens: Tensor,
        hooks: Sequence[str],
        stop: int | None,
        shapes_only: bool = False,
        needs: Needs | None = None,
    ) -> dict:
        captured: dict = {}
        tokens = tokens.to(self.device)

        def grab(name: str):
            def hook_fn(activation, hook):
                captured[name] = tuple(activation.shape) if shapes_only else activation.detach().flatten(2)

            return hook_fn

        with torch.no_grad(), self._bridge_hooks([(name, grab(name)) for name in hooks], needs=needs):
            self.bridge.run_with_hooks(
                tokens, return_type=None, stop_at_layer=stop, attention_mask=self._padding_mask(tokens)
            )
        return captured

    @property
    def unembed(self) -> Float[Tensor, "d_model vocab"]:
        """W_U (for BERT-style encoders: the randomly initialised MLM head; meaningless)."""
        return self.bridge.W_U.detach()

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 30,
        do_sample: bool = False,
        temperature: float = 1.0,
        seed: int | None = 0,
    ) -> str:
        """Prompt + continuation as text (greedy unless `do_sample`; seeded when sampling)."""
        if not self.source.causal:
            raise WorkbenchError(f"model {self.spec!r} is an encoder and cannot generate text")
        if do_sample and seed is not None:
            torch.manual_seed(seed)
        return self.bridge.generate(
            prompt,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            use_past_kv_cache=True,
            return_type="str",
            verbose=False,
            stop_at_eos=False,
        )


def _first_device(bridge) -> torch.device:
    first = next(bridge.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _model_name(spec: str) -> str:
    """A spec's folder or hub name without its parents or organisation, lowercased, with
    TransformerLens aliases resolved ("gpt2-small" -> "gpt2"); resolves no hub or packaged model.
    Lenient on purpose: the same folder named from another working directory must match."""
    from transformer_lens.supported_models import get_official_model_name

    if spec == "demo":
        spec = resolve(spec).name_or_path
    try:
        spec = get_official_model_name(spec)
    except ValueError:  # not a name TransformerLens knows
        pass
    return Path(spec).name.lower()


def _stop_layer(hooks: Sequence[str], n_layers: int) -> int | None:
    """One past the last block a hook lives in, or None when a hook lies after the blocks."""
    layers = [_BLOCK.match(h) for h in hooks]
    if not hooks or any(m is None for m in layers):
        return None
    last = max(int(m.group(1)) for m in layers) + 1
    return None if last >= n_layers else last


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-file "Loading weights" bars from transformers (they would bury our one-line errors)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_model(
    spec: str = "demo", device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
) -> Model:
    """Load a model by spec: 'demo', a local HF folder, 'gemma-3-270m', 'minilm', or a hub name.

    `device`: a `--device` value (auto, cpu, cuda, cuda:N; `workbench.devices.resolve_device`);
    `dtype`: the forward's dtype, a torch.dtype or a `--model-dtype` name (float32, bfloat16,
    float16). Raises UnknownModelError, or DeviceError for a device this machine lacks."""
    device = resolve_device(device)
    dtype = model_dtype(dtype) if isinstance(dtype, str) else dtype
    source = resolve(spec)
    from transformer_lens.model_bridge import TransformerBridge

    try:
        with quiet_transformers():
            bridge = TransformerBridge.boot_transformers(source.name_or_path, device=device, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        where = (
            "local folder"
            if source.is_local
            else "hub name (is the hub reachable? HF_HUB_OFFLINE is "
            + os.environ.get("HF_HUB_OFFLINE", "unset")
            + ")"
        )
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        known = ", ".join(BUILTIN_MODELS)
        raise UnknownModelError(
            f"cannot load model {spec!r} as a {where}: {first} (built-in: {known})"
        ) from None
    bridge.eval()
    return Model(source, bridge)
