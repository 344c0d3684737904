"""What `workbench bench sae` runs: one small config (its flags derive from it; see `sae.bench`)."""

from __future__ import annotations

from dataclasses import dataclass

from workbench.errors import ConfigError

SCENARIO_NAMES = ("zipf", "hierarchy", "correlated", "16x")


@dataclass(frozen=True)
class SaeBenchConfig:
    """What `workbench bench sae` runs (printed above its table, so a table can be rerun with `--config`)."""

    arch: tuple[str, ...] = ()
    """Architectures; empty means every registered one."""
    scenario: tuple[str, ...] = ("zipf", "hierarchy")
    """Data scenarios: zipf, hierarchy, correlated, 16x (see sae.bench)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (data and training); the summary reports the mean and the worst."""
    samples: int = 2_000_000
    """Training samples (one pass)."""
    features: int = 0
    """Planted features (= latents); 0 means the scenario's (1,024; 4,096 for 16x)."""
    d: int = 0
    """Activation width; 0 means the scenario's (256)."""
    threads: int = 2
    """torch threads."""

    def __post_init__(self):
        unknown = sorted(set(self.scenario) - set(SCENARIO_NAMES))
        if unknown or not self.scenario:
            raise ConfigError(f"unknown scenario {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(SCENARIO_NAMES)}")
        if self.samples <= 0 or not self.seeds or self.features < 0 or self.d < 0:
            raise ConfigError("samples must be positive, features and d >= 0, and at least one seed given")
