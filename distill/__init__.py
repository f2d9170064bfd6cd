"""TinyBERT-style layerwise distillation (see issue 4)."""
