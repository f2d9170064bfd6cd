"""Weight quantization: pure primitives, the QuantLinear module, and one file per method."""
