"""The built-in architectures, one module each; importing this package registers them
(`sae.base.register`). `sae.base` imports it on the first registry lookup.

Named `dictionaries`, not `architectures`: a subpackage `sae.architectures` would replace the
function `sae.architectures()` on the `sae` package once imported."""

from sae.dictionaries import batchtopk, choice, codebook, gated, jumprelu, matryoshka, relu, topk  # noqa: F401
