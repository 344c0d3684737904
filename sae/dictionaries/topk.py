"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

f = ReLU(TopK_k(z)); loss = |x - x_hat|^2 + alpha * AuxK, where AuxK lets the top-aux_k
pre-activations of dead latents reconstruct the residual (see `sae.base.aux_k_loss`), with its
gradient reaching the encoder through the fused kernels' second selection.
"""

from __future__ import annotations

from sae.base import register, relu_values
from sae.dictionaries.auxk import AuxKDictionary
from workbench.kernels import encode_topk


@register("topk")
class TopK(AuxKDictionary):
    def _select(self, x, aux_mask):
        k_aux = self.config.effective_aux_k
        return encode_topk(
            x,
            self.W_enc,
            self.b_enc,
            self.config.k,
            aux_k=k_aux,
            aux_mask=aux_mask,
            shift=self.encoder_shift,
            approximate=self.config.approx_topk,
            aux_stride=self.aux_stride(x.shape[0]),
        )

    def _encode(self, x):
        return relu_values(encode_topk(x, self.W_enc, self.b_enc, self.config.k, shift=self.encoder_shift))
