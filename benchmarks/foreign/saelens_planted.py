"""A foreign planted-feature benchmark: SAELens's own synthetic model, scored by SAELens's MCC.

Runs in a separate virtual environment that holds `sae-lens` (it pins transformer-lens < 4, so it
cannot share ours); `make bench-foreign` builds that environment and drives the whole loop:

    make  --out DIR [--samples N] [--seed S]   SyntheticModel(num_features=1024, hidden_dim=256,
                                               seed=S): Zipf firing 0.3 -> 0.01, magnitudes 1,
                                               a bias of norm 1. Writes DIR/activations.npy
                                               [N, 256] (for `workbench cache --from`) and
                                               DIR/truth.npy (the true feature directions).
    score --truth DIR FOLDER [FOLDER ...]      For each dictionary folder (weights.safetensors
                                               with W_dec [latents, d]): SAELens's
                                               mean_correlation_coefficient, recovered@0.9 (true
                                               features whose Hungarian-matched latent has
                                               |cos| >= 0.9), one JSON line each.

Nothing here imports the workbench: the data and the scores come from the peer's code alone.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
from sae_lens.synthetic.evals import mean_correlation_coefficient
from safetensors.torch import load_file
from scipy.optimize import linear_sum_assignment


def make(out: Path, samples: int, seed: int, chunk: int = 65_536) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = SyntheticModel(SyntheticModelConfig(num_features=1024, hidden_dim=256, seed=seed))
    torch.manual_seed(seed + 12345)  # the generator samples from the global RNG
    rows = np.lib.format.open_memmap(
        out / "activations.npy", mode="w+", dtype=np.float32, shape=(samples, 256)
    )
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        rows[start : start + n] = model.sample(n).numpy()
    rows.flush()
    np.save(out / "truth.npy", model.feature_dict.feature_vectors.detach().numpy())
    l0 = float(model.activation_generator.firing_probabilities.sum())
    print(json.dumps({"out": str(out), "samples": samples, "seed": seed, "expected_l0": round(l0, 2)}))


def score(truth: Path, folders: list[Path]) -> None:
    features = torch.from_numpy(np.load(truth / "truth.npy"))
    for folder in folders:
        decoder = load_file(str(folder / "weights.safetensors"))["W_dec"].float()
        mcc = mean_correlation_coefficient(features, decoder)
        cos = (
            torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(decoder, dim=1).t()
        )
        rows, cols = linear_sum_assignment(-cos.abs().numpy())
        matched = cos.abs()[torch.as_tensor(rows), torch.as_tensor(cols)]
        config = json.loads((folder / "config.json").read_text())
        print(
            json.dumps(
                {
                    "folder": str(folder),
                    "arch": config.get("architecture"),
                    "mcc": round(mcc, 4),
                    "recovered_0.9": round(float((matched >= 0.9).float().mean()), 4),
                }
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", type=Path, required=True)
    m.add_argument("--samples", type=int, default=2_000_000)
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score")
    s.add_argument("--truth", type=Path, required=True)
    s.add_argument("folders", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "make":
        make(args.out, args.samples, args.seed)
    else:
        score(args.truth, args.folders)


if __name__ == "__main__":
    main()
