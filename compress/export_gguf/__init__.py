"""Our GPTQ/RTN/AWQ codes written as llama.cpp's GGUF blocks (issue 16)."""
