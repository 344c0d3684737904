"""Settings of `workbench explain` (one frozen dataclass; the CLI flags are derived from it)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from workbench.errors import ConfigError


@dataclass(frozen=True)
class ExplainConfig:
    features: tuple[int, ...] = ()
    """Features to explain (e.g. --features 1,5,9); empty means the --top densest."""
    top: int = 20
    """Without --features: explain this many features, the densest first (features that never
    fired are skipped)."""
    endpoint: str = ""
    """Base URL of an OpenAI-compatible chat API (http://127.0.0.1:8080/v1 for llama.cpp or
    vLLM, http://127.0.0.1:11434/v1 for Ollama); empty means offline: each feature's
    data-derived summary."""
    model: str = ""
    """Model the endpoint serves, asked for explanations (needed with --endpoint)."""
    scorer_model: str = ""
    """Model that scores explanations by detection; empty means --model."""
    api_key_env: str = ""
    """Environment variable holding the API key, sent as 'Authorization: Bearer'; empty means
    no key (local servers). The key is never written anywhere."""
    examples: int = 10
    """Activating examples shown to the explainer (half top examples, half quantile examples not held out)."""
    holdout: int = 5
    """Held-out activating contexts per feature for detection, mixed with as many non-activating ones."""
    score_batch: int = 10
    """Contexts per scorer request."""
    seed: int = 0
    """Seed of the held-out split, the non-activating contexts and their shuffled order."""
    concurrency: int = 4
    """Features explained at once (parallel requests to the endpoint)."""
    timeout: float = 120.0
    """Seconds to wait for one reply."""
    retries: int = 4
    """Retries of a request answered 429 or 5xx or timed out, with exponential backoff."""
    temperature: float = 0.0
    """Sampling temperature sent with every request."""
    max_tokens: int = 512
    """Reply length limit sent with every request (reasoning models need more)."""
    redo: bool = False
    """Explain again features this explainer (or, offline, an LLM) already explained; default:
    skip them, so a stopped run resumes."""

    def __post_init__(self):
        for name in ("top", "examples", "score_batch", "concurrency", "max_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("holdout", "retries", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.timeout > 0 or not 0 <= self.temperature <= 2:
            raise ConfigError("timeout must be positive and temperature in [0, 2]")
        if any(f < 0 for f in self.features):
            raise ConfigError(f"features must be >= 0, got {list(self.features)}")
        if self.endpoint:
            parts = urlsplit(self.endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigError(f"endpoint must be an http(s) URL, got {self.endpoint!r}")
            if not self.model:
                raise ConfigError("--endpoint needs --model (the name the server knows the model by)")
        elif self.model or self.scorer_model:
            raise ConfigError(
                "--model needs --endpoint (without one, explanations are the offline summaries)"
            )

    def recorded(self) -> dict:
        """The settings written with the explanations: the endpoint without any user:password."""
        from dataclasses import asdict

        parts = urlsplit(self.endpoint)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        netloc = f"{host}:{parts.port}" if parts.port else host
        endpoint = urlunsplit(parts._replace(netloc=netloc)) if self.endpoint else ""
        return {**asdict(self), "endpoint": endpoint, "features": list(self.features)}
