"""`workbench bench kernels`: one SAE training step, fused vs dense vs the limit.

For each architecture three cases run interleaved in one process (medians over `reps`):
- limit: the dense encoder matmul (x @ W_enc.T + b_enc) and a per-row top-k, nothing else;
- dense: the whole step with the eager twins (WORKBENCH_KERNELS=eager: dense pre-activations
  in the autograd graph, dense decode, dense backward), as SAELens-style code does it;
- fused: the same step on the sparse kernels.
A step is encode -> activation -> decode -> MSE (+ the architecture's extra terms) ->
backward -> fused Adam. JumpReLU's threshold starts where k latents per token fire on
average. `peak_mb` is measured on the device the steps ran, in one more, untimed step per path
(the fused encoder's reused pre-activation buffer is released first, so the step allocates it
again), plus the persistent state (weights, Adam moments): on the CPU the growth of the process
RSS (sampled; allocations >= 1 MB mmap'd for that pass, so freed memory leaves the RSS; the
trainer's rows are not measured), on a GPU the growth of the CUDA allocator's peak
(`devices.peak_memory`). `--device` puts the inputs, weights, optimizer and steps there (the
inputs and weights are drawn on the CPU, so every device starts from the same numbers); the
`auto` kernel backend is Triton on CUDA (`describe_run` says which ran). On CUDA the clock
starts and stops after the device's queued work (`workbench.bench.interleaved`).
`--matmul-dtype bfloat16` runs the selection matmul of the fused, approx and trainer steps in bf16
(`workbench.kernels.use_matmul_dtype`) and the limit's matmul too (inputs and weights cast each
step, as the fused step does); the dense step stays the fp32 reference.
`mem_budget_mb` = dense pre-activation buffer + weights + Adam moments. With --approx-topk the
TopK cases add a fourth, `approx`: the fused step with int8 top-k candidates re-ranked exactly,
and its recall of the exact top-k.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
import torch.nn.functional as F

from workbench.bench import interleaved, median
from workbench.bench_memory import peak_device_bytes, peak_host_bytes
from workbench.devices import MATMUL_DTYPES, check_device_spec, check_dtype_name, describe, is_cuda
from workbench.errors import ConfigError
from workbench.kernels import (
    codebook_lookup,
    decode,
    decode_prefixes,
    encode_batch_topk,
    encode_threshold,
    encode_topk,
    release_workspace,
    use_kernels,
)
from workbench.kernels.backend import use_matmul_dtype

ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "matryoshka", "codebook")


@dataclass(frozen=True)
class KernelBenchCase:
    architecture: str
    n_latents: int

    @property
    def name(self) -> str:
        width = f"{self.n_latents // 1024}k" if self.n_latents % 1024 == 0 else str(self.n_latents)
        return f"{self.architecture}-{width}"


DEFAULT_CASES = (
    KernelBenchCase("topk", 16_384),
    KernelBenchCase("topk", 65_536),
    KernelBenchCase("batchtopk", 16_384),
    KernelBenchCase("jumprelu", 16_384),
    KernelBenchCase("matryoshka", 16_384),
    KernelBenchCase("codebook", 16_384),
)


@dataclass(frozen=True)
class KernelBenchConfig:
    """What `workbench bench kernels` times (its flags derive from it)."""

    FLAG_ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {"architectures": ("--arch",)}
    """`--arch` is the field's short flag (as for `workbench train`)."""

    batch_size: int = 4096
    """Tokens per step."""
    d_in: int = 768
    """Activation width."""
    k: int = 32
    """Active latents per token."""
    n_latents: tuple[int, ...] = ()
    """Dictionary widths; empty means 16384 for all, 65536 for topk too."""
    architectures: tuple[str, ...] = ()
    """Architectures; empty means topk batchtopk jumprelu matryoshka codebook."""
    reps: int = 5
    """Interleaved repetitions (medians reported)."""
    threads: int = 2
    """torch threads."""
    approx_topk: bool = False
    """Also time TopK with int8 top-k candidates re-ranked exactly, and report its recall."""
    trainer: bool = True
    """Also time the trainer's real TopK step (no dead latents, and with AuxK on 1/8 dead); --no-trainer
    skips it."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N."""
    matmul_dtype: str = "float32"
    """The encoders' selection matmul (and the limit's): float32, or bfloat16 (faster on GPUs)."""

    def __post_init__(self):
        check_device_spec(self.device)
        check_dtype_name(self.matmul_dtype, MATMUL_DTYPES, "matmul_dtype")
        unknown = sorted(set(self.architectures) - set(ARCHITECTURES))
        if unknown:
            raise ConfigError(f"unknown architecture {unknown[0]!r}; choose from {', '.join(ARCHITECTURES)}")
        cases = kernel_cases(self)
        if (
            min(self.batch_size, self.d_in, self.k, self.reps, self.threads, *(c.n_latents for c in cases))
            < 1
        ):
            raise ConfigError("batch_size, d_in, k, reps, threads and n_latents must be positive")
        if any(self.k > c.n_latents // 8 for c in cases):
            raise ConfigError("k must be at most n_latents / 8 (Matryoshka's smallest prefix)")

    @classmethod
    def upgrade_json(cls, obj: dict) -> dict:
        """A config saved before the fields were renamed (issue 18: batch, latents, arch), in
        today's names."""
        return {RENAMED.get(k, k): v for k, v in obj.items()}


RENAMED = {"batch": "batch_size", "latents": "n_latents", "arch": "architectures"}
"""Old KernelBenchConfig field name -> new, for configs saved before the rename."""


def kernel_cases(config: KernelBenchConfig) -> list[KernelBenchCase]:
    """The (architecture, width) cases of `config`: its widths for each architecture, else the defaults."""
    architectures = config.architectures or ARCHITECTURES
    if config.n_latents:
        return [KernelBenchCase(a, m) for a in architectures for m in config.n_latents]
    return [c for c in DEFAULT_CASES if c.architecture in architectures]


class _Step:
    """One architecture's parameters, optimizer and training step."""

    def __init__(
        self,
        architecture: str,
        x: torch.Tensor,
        n_latents: int,
        k: int,
        seed: int,
        approximate: bool = False,
        matmul_dtype: torch.dtype = torch.float32,
    ):
        g = torch.Generator().manual_seed(seed)
        d, device = x.shape[1], x.device
        self.architecture, self.x, self.k, self.approximate = architecture, x, k, approximate
        self.matmul_dtype = matmul_dtype
        w = (torch.randn(n_latents, d, generator=g) / d**0.5).to(device)  # drawn on the CPU
        if architecture == "codebook":
            self.params = {"codebook": w.requires_grad_()}
        else:
            self.params = {
                "w_enc": w.clone().requires_grad_(),
                "b_enc": torch.zeros(n_latents, device=device, requires_grad=True),
                "w_dec": w.requires_grad_(),
                "b_dec": torch.zeros(d, device=device, requires_grad=True),
            }
            if architecture == "jumprelu":  # calibrated so that k latents per token fire on average
                with torch.no_grad():
                    cutoff = (x @ w.t()).view(-1).topk(x.shape[0] * k, sorted=False).values.min()
                self.params["threshold"] = torch.full(
                    (n_latents,), float(cutoff), device=device, requires_grad=True
                )
        self.optimizer = torch.optim.Adam(self.params.values(), lr=1e-4, fused=True)

    def __call__(self) -> None:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def loss(self) -> torch.Tensor:
        x, p, k = self.x, self.params, self.k
        if self.architecture == "codebook":
            out, _ = codebook_lookup(x, p["codebook"], k)
            return (out - x).pow(2).sum(-1).mean()
        if self.architecture == "jumprelu":
            codes = encode_threshold(x, p["w_enc"], p["b_enc"], p["threshold"], window=0.01, shift=p["b_dec"])
            window = codes.extra
            # the threshold's L0 pseudo-gradient lives on the near-threshold window only
            l0 = -(p["threshold"][window.flat_indices()] / 0.01).sum() / x.shape[0]
            return (decode(codes, p["w_dec"], p["b_dec"]) - x).pow(2).sum(-1).mean() + 1e-3 * l0
        if self.architecture == "batchtopk":
            codes = encode_batch_topk(
                x, p["w_enc"], p["b_enc"], k, shift=p["b_dec"]
            )  # encodes x - b_dec, as the SAEs do
        else:
            codes = encode_topk(x, p["w_enc"], p["b_enc"], k, shift=p["b_dec"], approximate=self.approximate)
        codes = codes.with_values(codes.values.relu())
        if self.architecture == "matryoshka":
            m = codes.n_latents
            recons = decode_prefixes(codes, p["w_dec"], p["b_dec"], [m // 8, m // 4, m // 2, m])
            return F.mse_loss(recons, x.expand_as(recons), reduction="sum") / x.shape[0]
        return (decode(codes, p["w_dec"], p["b_dec"]) - x).pow(2).sum(-1).mean()

    def limit(self) -> None:
        with torch.no_grad():
            x, w = self.x, self.params.get("w_enc", self.params.get("codebook"))
            b = self.params.get("b_enc")
            if self.matmul_dtype != x.dtype:  # the casts are part of a low-precision matmul's cost
                low = self.matmul_dtype
                x, w, b = x.to(low), w.to(low), None if b is None else b.to(low)
            pre = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
            pre.topk(self.k, dim=1, sorted=False)

    def persistent_bytes(self) -> int:
        tensors = list(self.params.values())
        tensors += [
            t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)


ExtraPaths = Callable[[KernelBenchCase, torch.Tensor, int], dict[str, Callable[[], None]]]


def run_kernel_benchmark(
    cases=DEFAULT_CASES,
    batch_size: int = 4096,
    d_in: int = 768,
    k: int = 32,
    reps: int = 5,
    threads: int = 2,
    seed: int = 0,
    approximate: bool = False,
    extra_paths: Optional[ExtraPaths] = None,
    device: torch.device | str = "cpu",
    matmul_dtype: torch.dtype = torch.float32,
) -> list[dict]:
    """Rows per case: limit, dense, fused; with `approximate`, TopK cases add `approx` (int8
    candidates, `workbench.kernels.approx`) and its top-k recall against the exact selection.
    `extra_paths(case, x, k)` may add more steps to a case (name -> callable), interleaved with
    the others, so their ratios to the limit come from the same rounds (the trainer's real step,
    `sae.bench_step`). Everything runs on `device` (a resolved torch.device or its name); the
    selection matmuls of all but the dense step in `matmul_dtype`."""
    torch.set_num_threads(threads)
    x = bench_inputs(batch_size, d_in, seed).to(device)
    rows = []
    for case in cases:
        extra = extra_paths(case, x, k) if extra_paths is not None else {}
        rows += _bench_case(
            case, x, k, reps, seed, approximate and case.architecture == "topk", extra, matmul_dtype
        )
        gc.collect()
    return rows


def bench_inputs(batch_size: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """The benchmark's activations [batch_size, d_in] (standard normal, seeded), on the CPU."""
    return torch.randn(batch_size, d_in, generator=torch.Generator().manual_seed(seed))


def describe_run(device: torch.device, matmul_dtype: str = "float32") -> str:
    """The bench header: where the steps run, which sparse backend `auto` picks there, the
    selection matmul's dtype, and what `peak_mb` measures."""
    from workbench.kernels.backend import sparse_ops

    with use_kernels("auto"):
        backend = sparse_ops(device).__name__.rsplit(".", 1)[-1].removesuffix("_ops")
    memory = "CUDA allocator peak" if is_cuda(device) else "process RSS"
    return (
        f"device {describe(device)}, kernels {backend} (auto), matmul {matmul_dtype}, "
        f"peak_mb from the {memory}"
    )


def _bench_case(
    case: KernelBenchCase,
    x: torch.Tensor,
    k: int,
    reps: int,
    seed: int,
    approximate: bool,
    extra: Optional[dict[str, Callable[[], None]]] = None,
    matmul_dtype: torch.dtype = torch.float32,
) -> list[dict]:
    steps = {
        "dense": _Step(case.architecture, x, case.n_latents, k, seed),
        "fused": _Step(case.architecture, x, case.n_latents, k, seed, matmul_dtype=matmul_dtype),
    }
    if approximate:
        steps["approx"] = _Step(case.architecture, x, case.n_latents, k, seed, approximate=True)
    extra = {name: _in_matmul_dtype(fn, matmul_dtype) for name, fn in (extra or {}).items()}
    runs = {
        "limit": steps["fused"].limit,
        **{path: _in_mode(step, path, matmul_dtype) for path, step in steps.items()},
        **extra,
    }
    recall = _top_k_recall(steps["approx"], k) if approximate else None
    times = {name: median(t) for name, t in interleaved(runs, reps, device=x.device).items()}
    memory = _memory(runs, steps, extra, x.device)
    budget = x.shape[0] * case.n_latents * x.element_size() + steps["fused"].persistent_bytes()
    return [
        {
            "name": f"{case.name}/{path}",
            "ms": times[path] * 1e3,
            "tokens_per_s": x.shape[0] / times[path],
            "x_limit": times[path] / times["limit"],
            "x_dense": times[path] / times["dense"],
            "peak_mb": memory[path] / 2**20 if memory[path] is not None else None,
            "mem_budget_mb": budget / 2**20,
            **({"recall": recall if path == "approx" else None} if approximate else {}),
        }
        for path in runs
    ]


def _memory(
    runs: dict, steps: dict[str, _Step], extra: dict, device: torch.device
) -> dict[str, Optional[int]]:
    """Bytes per path at the peak of one untimed step: its growth plus the path's persistent state
    (an extra path's `persistent_bytes()` where it has one; not measured on the CPU)."""
    on_gpu = is_cuda(device)
    measure = (lambda fn: peak_device_bytes(fn, device)) if on_gpu else peak_host_bytes
    memory: dict[str, Optional[int]] = {"limit": measure(runs["limit"])}
    for name, fn in extra.items():
        persistent = getattr(fn, "persistent_bytes", None)
        memory[name] = measure(fn) + persistent() if on_gpu and persistent is not None else None
    for path, step in steps.items():
        release_workspace()  # each path's measured step allocates the buffers it uses
        memory[path] = measure(runs[path]) + step.persistent_bytes()
    return memory


def _in_mode(step: _Step, path: str, matmul_dtype: torch.dtype = torch.float32) -> Callable[[], None]:
    """The step in its kernel mode: the dense twins (fp32) for `dense`, else `auto` with the
    selection matmul in `matmul_dtype`."""
    mode = "eager" if path == "dense" else "auto"
    low = torch.float32 if path == "dense" else matmul_dtype

    def run() -> None:
        with use_kernels(mode), use_matmul_dtype(low):
            step()

    return run


def _in_matmul_dtype(fn: Callable[[], None], matmul_dtype: torch.dtype) -> Callable[[], None]:
    """An extra path with its selection matmul in `matmul_dtype` (keeping its `persistent_bytes`)."""

    def run() -> None:
        with use_matmul_dtype(matmul_dtype):
            fn()

    if hasattr(fn, "persistent_bytes"):
        run.persistent_bytes = fn.persistent_bytes  # type: ignore[attr-defined]
    return run


@torch.no_grad()
def _top_k_recall(step: _Step, k: int) -> float:
    """The share of the exact per-row top-k latents that the approximate selection keeps."""
    p = step.params
    with use_kernels("auto"):
        approximate = encode_topk(
            step.x, p["w_enc"], p["b_enc"], k, shift=p["b_dec"], approximate=True
        ).indices
    exact = torch.addmm(p["b_enc"], step.x - p["b_dec"], p["w_enc"].t()).topk(k, dim=1).indices
    return float((approximate[:, :, None] == exact[:, None, :]).any(-1).float().mean())
