"""Recipes: prune -> distill -> quantize -> export as one resumable run, every stage benchmarked, one report."""
