"""Weight-only quantisation of frozen linear layers and embeddings (int8 per row, int4 group-wise)."""

from lmstack.quant.linear import (QuantEmbedding, QuantLinear, dequantize, quantize_embeddings, quantize_int4,
                                  quantize_int8, quantize_model, quantized_linear, quantizing_loader)

__all__ = ["QuantEmbedding", "QuantLinear", "dequantize", "quantize_embeddings", "quantize_int4", "quantize_int8",
           "quantize_model", "quantized_linear", "quantizing_loader"]
