"""Zero-shot task accuracy through lm-evaluation-harness: its own task configs (prompts, metrics), run on the
model as our benchmark's backend runs it (``lm.CompressLM``), with the data read from offline copies where
``$COMPRESS_DATA_DIR`` holds them (``sources``)."""
