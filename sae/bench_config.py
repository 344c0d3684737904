"""What `workbench bench sae` runs: one small config (its flags derive from it; see `sae.bench`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from workbench.devices import check_device_spec
from workbench.errors import ConfigError

SCENARIO_NAMES = ("zipf", "hierarchy", "correlated", "16x")


@dataclass(frozen=True)
class SaeBenchConfig:
    """What `workbench bench sae` runs (printed above its table, so a table can be rerun with `--config`)."""

    FLAG_ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {"architectures": ("--arch",)}
    """`--arch` is the field's short flag (as for `workbench train`)."""

    architectures: tuple[str, ...] = ()
    """Architectures; empty means every registered one."""
    scenario: tuple[str, ...] = ("zipf", "hierarchy")
    """Data scenarios: zipf, hierarchy, correlated, 16x (see sae.bench)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds (data and training); the summary reports the mean and the worst."""
    samples: int = 2_000_000
    """Training samples (one pass)."""
    n_planted: int = 0
    """Planted features, and the dictionaries' width (n_latents = n_planted); 0 means the
    scenario's (1,024; 4,096 for 16x)."""
    d_in: int = 0
    """Activation width; 0 means the scenario's (256)."""
    threads: int = 2
    """torch threads."""
    device: str = "auto"
    """Where to compute: auto (the first usable CUDA device, else the CPU), cpu, cuda or cuda:N.
    The data are generated on the CPU (the same streams on every device), the dictionaries train
    on the device and are scored on the CPU."""

    def __post_init__(self):
        check_device_spec(self.device)
        unknown = sorted(set(self.scenario) - set(SCENARIO_NAMES))
        if unknown or not self.scenario:
            raise ConfigError(
                f"unknown scenario {unknown[0] if unknown else '(none)'!r}; "
                f"choose from {', '.join(SCENARIO_NAMES)}"
            )
        if self.samples <= 0 or not self.seeds or self.n_planted < 0 or self.d_in < 0:
            raise ConfigError(
                "samples must be positive, n_planted and d_in >= 0, and at least one seed given"
            )

    @classmethod
    def upgrade_json(cls, obj: dict) -> dict:
        """A config printed before the fields were renamed (issue 18: arch, features, d), in today's names."""
        return {RENAMED.get(k, k): v for k, v in obj.items()}


RENAMED = {"arch": "architectures", "features": "n_planted", "d": "d_in"}
"""Old field name -> new, for configs printed before the rename."""
