"""Weight-only quantisation of frozen linear layers (int8 per row, int4 group-wise)."""

from lmstack.quant.linear import QuantLinear, dequantize, quantize_int4, quantize_int8, quantize_model, quantized_linear

__all__ = ["QuantLinear", "dequantize", "quantize_int4", "quantize_int8", "quantize_model", "quantized_linear"]
