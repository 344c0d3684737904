"""Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024): nested dictionaries in one.

BatchTopK selection over the full width; the first m_1 < m_2 < ... < m_L latents must each
reconstruct x on their own: loss = sum_l |x - x_hat_l|^2 + alpha * AuxK, where x_hat_l decodes
only the latents [0, m_l). All L reconstructions come from one sparse decode (the kernels'
`decode_prefixes`), never a dense decode per prefix. Inference is BatchTopK's JumpReLU.
"""

from __future__ import annotations

from sae.base import reconstruction_loss, register
from sae.dictionaries.batchtopk import BatchTopK
from workbench.kernels import decode_prefixes


@register("matryoshka")
class Matryoshka(BatchTopK):
    @property
    def prefix_ends(self) -> list[int]:
        m = self.n_latents
        ends = sorted({max(1, round(fraction * m)) for fraction in self.config.prefixes})
        return ends if ends[-1] == m else ends + [m]

    def _reconstruct(self, x, f):
        x_hats = decode_prefixes(f, self.W_dec, self.b_dec, self.prefix_ends)
        per_prefix = [reconstruction_loss(x, x_hat) for x_hat in x_hats]
        terms = {f"mse_{end}": term.detach() for end, term in zip(self.prefix_ends, per_prefix)}
        terms["mse"] = per_prefix[-1].detach()
        return x_hats[-1], sum(per_prefix), terms
