"""Measurements: one metric per module, plain functions."""
