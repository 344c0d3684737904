"""A GPT-2-style transformer written as a graph of nodes and edges, so every edge can be patched.

Nodes that write to the residual stream (sources): `embed` (token + position embeddings),
`a{l}.{h}` (attention head h of layer l, its share of the output bias included), `m{l}` (MLP
of layer l). Node inputs (receivers): the query, key and value inputs of every head
(`a{l}.{h}.q|k|v`), every MLP's input (`m{l}`) and the unembedding (`logits`). Each receiver
reads the sum of the outputs of the sources before it; with an edge mask M,

    input_r = Σ_u  M[u, r] · out_u  +  (1 − M[u, r]) · ablated_u

where `ablated_u` is node u's output on corrupted inputs (resample ablation), its mean (mean
ablation) or zero. M = 1 is the model itself (tested against HF GPT-2 logits); a 0/1 mask is
edge patching (the downstream nodes recompute); the gradient with respect to M is EAP's edge
attribution; integrating it along M = α·1 is EAP-IG over activations.

The model computes where its parameters are (`model.to(device)`); tokens, masks and ablated
outputs given to `forward` are moved there, and `full_mask` is made there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    n_heads: int
    d_vocab: int
    n_ctx: int
    d_mlp: int = 0
    """0: attention only."""
    layer_norm: bool = True
    eps: float = 1e-5

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class Graph:
    """The node and edge lists of a Shape, with index maps."""

    sources: tuple[str, ...]
    receivers: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]
    """(source index, receiver index) of every edge: the source comes before the receiver."""

    @cached_property
    def allowed(self) -> Tensor:
        """[sources, receivers] bool: which entries are edges."""
        return self.matrix(torch.ones(len(self.edges), dtype=torch.bool))

    @cached_property
    def edge_names(self) -> list[str]:
        """'source->receiver' per edge, e.g. 'a0.1->a1.0.k' (how ground truths name edges)."""
        return [f"{self.sources[s]}->{self.receivers[r]}" for s, r in self.edges]

    @cached_property
    def edge_index(self) -> tuple[Tensor, Tensor]:
        """(source indices, receiver indices) of the edges, so matrix[edge_index] lists per-edge entries."""
        sources, receivers = zip(*self.edges)
        return torch.tensor(sources), torch.tensor(receivers)

    def index_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """`edge_index` on `device` (the cached CPU tensors themselves on the CPU)."""
        sources, receivers = self.edge_index
        return sources.to(device), receivers.to(device)

    def per_edge(self, matrix: Tensor) -> Tensor:
        """[edges] entries of a [sources, receivers] matrix, on the matrix's device."""
        return matrix[self.index_on(matrix.device)]

    def matrix(self, per_edge: Tensor) -> Tensor:
        """The [sources, receivers] matrix holding `per_edge` values (0 elsewhere), on their device."""
        out = torch.zeros(
            len(self.sources), len(self.receivers), dtype=per_edge.dtype, device=per_edge.device
        )
        out[self.index_on(per_edge.device)] = per_edge
        return out


def build_graph(shape: Shape) -> Graph:
    sources, receivers, upto = ["embed"], [], []
    for layer in range(shape.n_layers):
        heads = [f"a{layer}.{h}" for h in range(shape.n_heads)]
        for head in heads:
            for part in "qkv":
                receivers.append(f"{head}.{part}")
                upto.append(len(sources))
        sources.extend(heads)
        if shape.d_mlp:
            receivers.append(f"m{layer}")
            upto.append(len(sources))
            sources.append(f"m{layer}")
    receivers.append("logits")
    upto.append(len(sources))
    edges = tuple((s, r) for r, n in enumerate(upto) for s in range(n))
    return Graph(tuple(sources), tuple(receivers), edges)


class GraphTransformer(nn.Module):
    def __init__(self, shape: Shape):
        super().__init__()
        self.shape = shape
        self.graph = build_graph(shape)
        L, d, H, dh = shape.n_layers, shape.d_model, shape.n_heads, shape.d_head
        self.W_E = nn.Parameter(torch.randn(shape.d_vocab, d) * 0.02)
        self.W_pos = nn.Parameter(torch.randn(shape.n_ctx, d) * 0.02)
        self.W_QKV = nn.Parameter(torch.randn(L, 3, H, d, dh) / math.sqrt(d))
        self.b_QKV = nn.Parameter(torch.zeros(L, 3, H, dh))
        self.W_O = nn.Parameter(torch.randn(L, H, dh, d) / math.sqrt(d))
        self.b_O = nn.Parameter(torch.zeros(L, d))
        self.ln1 = nn.Parameter(torch.ones(L, 2, d))  # weight, bias (bias row starts at 1: fixed below)
        with torch.no_grad():
            self.ln1[:, 1] = 0
        if shape.d_mlp:
            self.W_in = nn.Parameter(torch.randn(L, d, shape.d_mlp) / math.sqrt(d))
            self.b_in = nn.Parameter(torch.zeros(L, shape.d_mlp))
            self.W_out = nn.Parameter(torch.randn(L, shape.d_mlp, d) / math.sqrt(shape.d_mlp))
            self.b_out = nn.Parameter(torch.zeros(L, d))
            self.ln2 = nn.Parameter(torch.stack([torch.ones(L, d), torch.zeros(L, d)], 1))
        self.ln_f = nn.Parameter(torch.stack([torch.ones(d), torch.zeros(d)]))
        self.W_U = nn.Parameter(torch.randn(d, shape.d_vocab) / math.sqrt(d))

    @property
    def device(self) -> torch.device:
        """Where the parameters are (and the forward computes)."""
        return self.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' (and the forward's) dtype."""
        return self.W_E.dtype

    # --- the pieces ----------------------------------------------------------------------
    def _norm(self, x: Tensor, params: Tensor) -> Tensor:
        if not self.shape.layer_norm:
            return x
        return F.layer_norm(x, x.shape[-1:], params[0], params[1], self.shape.eps)

    def embed(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.shape.n_ctx:
            raise WorkbenchError(f"prompt of {tokens.shape[1]} tokens exceeds n_ctx {self.shape.n_ctx}")
        return self.W_E[tokens.to(self.device)] + self.W_pos[: tokens.shape[1]]

    def heads(self, layer: int, qkv_in: Tensor) -> tuple[Tensor, Tensor]:
        """qkv_in [3, H, B, P, d] -> (per-head outputs [H, B, P, d], attention [B, H, P, P])."""
        normed = self._norm(qkv_in, self.ln1[layer])
        q, k, v = (
            torch.einsum("hbpd,hde->bhpe", normed[i], self.W_QKV[layer, i])
            + self.b_QKV[layer, i][None, :, None]
            for i in range(3)
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.shape.d_head)
        P = scores.shape[-1]
        causal = torch.ones(P, P, dtype=torch.bool, device=scores.device).tril()
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        z = pattern @ v  # [B, H, P, dh]
        out = torch.einsum("bhpe,hed->hbpd", z, self.W_O[layer]) + self.b_O[layer] / self.shape.n_heads
        return out, pattern

    def mlp(self, layer: int, x: Tensor) -> Tensor:
        hidden = F.gelu(
            self._norm(x, self.ln2[layer]) @ self.W_in[layer] + self.b_in[layer], approximate="tanh"
        )
        return hidden @ self.W_out[layer] + self.b_out[layer]

    def unembed(self, x: Tensor) -> Tensor:
        return self._norm(x, self.ln_f) @ self.W_U

    # --- the forward pass over the graph -------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        mask: Tensor | None = None,
        ablated: Tensor | None = None,
        embed_override: Tensor | None = None,
        keep: bool = False,
        upstream: tuple[int, Tensor] | None = None,
    ):
        """Logits [B, P, V]. With `mask` [sources, receivers] (values in [0, 1]) and `ablated`
        [sources, B, P, d], every receiver reads the mixture above. A batch of M masks [M, sources,
        receivers] runs the B prompts under each in one pass: logits [M·B, P, V], mask m's rows at
        m·B .. m·B + B − 1 (`ablated` stays [sources, B, P, d]; ACDC scores candidates this way).
        `embed_override` replaces the embed node's output (EAP-IG over inputs). With keep=True also
        returns (outputs [sources, B', P, d], receiver inputs [receivers, B', P, d], attention
        patterns per layer), B' the rows of the logits. `upstream` (layer ℓ, outputs [sources, B,
        P, d] of a forward whose mask agrees with `mask` on every receiver before layer ℓ) reuses
        those outputs and computes from layer ℓ on (ℓ = n_layers: the logits only); ACDC's trials
        change one receiver's inputs, so the layers before it need no recomputing."""
        S, R = self.graph.sources, self.graph.receivers
        if mask is not None and mask.dim() == 3:
            if embed_override is not None:
                raise WorkbenchError("a batch of masks takes token ids, not an embed override")
            tokens = tokens.repeat(mask.shape[0], 1)
        first, r = 0, 0
        if upstream is not None:
            first = upstream[0]
            per_layer = self.shape.n_heads + (1 if self.shape.d_mlp else 0)
            outputs = list(upstream[1][: 1 + first * per_layer])
            r = first * (3 * self.shape.n_heads + (1 if self.shape.d_mlp else 0))
        else:
            outputs = [self.embed(tokens) if embed_override is None else embed_override]
        inputs: list[Tensor] = []
        patterns = []
        for layer in range(first, self.shape.n_layers):
            H = self.shape.n_heads
            qkv = self._receive(outputs, r, 3 * H, mask, ablated)  # [3H, B, P, d]
            if keep:  # the inputs handed back must be the tensors the heads read (for gradients)
                parts = list(qkv.unbind(0))
                inputs.extend(parts)
                qkv = torch.stack(parts)
            r += 3 * H
            out, pattern = self.heads(layer, qkv.view(H, 3, *qkv.shape[1:]).transpose(0, 1))
            outputs.extend(out)
            patterns.append(pattern)
            if self.shape.d_mlp:
                x = self._receive(outputs, r, 1, mask, ablated)[0]
                inputs.append(x)
                r += 1
                outputs.append(self.mlp(layer, x))
        final = self._receive(outputs, r, 1, mask, ablated)[0]
        inputs.append(final)
        logits = self.unembed(final)
        assert len(outputs) == len(S) and r + 1 == len(R)
        if keep:
            return logits, torch.stack(outputs), inputs, patterns
        return logits

    def _receive(
        self, outputs: list[Tensor], first: int, count: int, mask: Tensor | None, ablated: Tensor | None
    ) -> Tensor:
        """Inputs of receivers first .. first+count-1 from the sources computed so far."""
        stack = torch.stack(outputs)  # [n, B, P, d]
        n = len(outputs)
        if mask is None:
            return stack.sum(0).expand(count, *stack.shape[1:])
        if mask.dim() == 3:
            return self._receive_batched(stack, first, count, mask, ablated)
        weights = mask[:n, first : first + count].to(stack.device, stack.dtype)  # [n, count]
        mixed = torch.einsum("nbpd,nc->cbpd", stack, weights)
        if ablated is not None:
            mixed = mixed + torch.einsum(
                "nbpd,nc->cbpd", ablated[:n].to(stack.device, stack.dtype), 1 - weights
            )
        return mixed

    def _receive_batched(
        self, stack: Tensor, first: int, count: int, mask: Tensor, ablated: Tensor | None
    ) -> Tensor:
        """`_receive` under M masks [M, sources, receivers]: stack [n, M·B, P, d] -> [count, M·B, P, d]."""
        n, rows = stack.shape[0], stack.shape[1]
        M = mask.shape[0]
        per_mask = stack.view(n, M, rows // M, *stack.shape[2:])
        weights = mask[:, :n, first : first + count].to(stack.device, stack.dtype)  # [M, n, count]
        mixed = torch.einsum("nmbpd,mnc->cmbpd", per_mask, weights)
        if ablated is not None:  # the same ablated outputs under every mask
            mixed = mixed + torch.einsum(
                "nbpd,mnc->cmbpd", ablated[:n].to(stack.device, stack.dtype), 1 - weights
            )
        return mixed.reshape(count, rows, *stack.shape[2:])

    def full_mask(self, value: float = 1.0) -> Tensor:
        """[sources, receivers] float32 on the model's device: `value` on every edge, 0 elsewhere."""
        return self.graph.allowed.to(self.device, torch.float32) * value


def from_gpt2(model) -> GraphTransformer:
    """The weights of a loaded GPT-2-architecture `workbench` Model as a GraphTransformer, on the
    model's device in the model's dtype (built on the CPU in float32, then moved)."""
    hf = model.bridge.original_model
    config = hf.config
    if getattr(config, "model_type", "") != "gpt2":
        raise WorkbenchError(
            f"the circuit graph supports GPT-2-architecture models, not {config.model_type!r}"
        )
    state = {k.replace("._original_component", ""): v.detach().float() for k, v in hf.state_dict().items()}
    d, H, L = config.n_embd, config.n_head, config.n_layer
    shape = Shape(
        L,
        d,
        H,
        config.vocab_size,
        config.n_positions,
        config.n_inner or 4 * d,
        True,
        config.layer_norm_epsilon,
    )
    graph = GraphTransformer(shape)
    dh = shape.d_head
    with torch.no_grad():
        graph.W_E.copy_(state["transformer.wte.weight"])
        graph.W_pos.copy_(state["transformer.wpe.weight"])
        for layer in range(L):
            p = f"transformer.h.{layer}."
            w, b = state[p + "attn.c_attn.weight"], state[p + "attn.c_attn.bias"]  # Conv1D: x @ w
            graph.W_QKV[layer].copy_(w.view(d, 3, H, dh).permute(1, 2, 0, 3))
            graph.b_QKV[layer].copy_(b.view(3, H, dh))
            graph.W_O[layer].copy_(state[p + "attn.c_proj.weight"].view(H, dh, d))
            graph.b_O[layer].copy_(state[p + "attn.c_proj.bias"])
            graph.ln1[layer].copy_(torch.stack([state[p + "ln_1.weight"], state[p + "ln_1.bias"]]))
            graph.ln2[layer].copy_(torch.stack([state[p + "ln_2.weight"], state[p + "ln_2.bias"]]))
            graph.W_in[layer].copy_(state[p + "mlp.c_fc.weight"])
            graph.b_in[layer].copy_(state[p + "mlp.c_fc.bias"])
            graph.W_out[layer].copy_(state[p + "mlp.c_proj.weight"])
            graph.b_out[layer].copy_(state[p + "mlp.c_proj.bias"])
        graph.ln_f.copy_(torch.stack([state["transformer.ln_f.weight"], state["transformer.ln_f.bias"]]))
        graph.W_U.copy_(state["lm_head.weight"].T)
    return graph.eval().to(model.device, model.dtype)
