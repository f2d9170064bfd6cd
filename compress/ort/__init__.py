"""ONNX export of decoder LMs with their KV cache, ONNX Runtime quantization (INT8 dynamic, and
MatMulNBits built from our own GPTQ/RTN codes), and generation through onnxruntime."""
