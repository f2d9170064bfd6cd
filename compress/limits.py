"""Sizes a run works within, torch-free: the run settings (read by --help) and the driver (which knows blocks and
layers, never the settings or the methods) both take them from here."""

DEFAULT_ACTIVATION_BUDGET = 2 << 30
"""Bytes of carried hidden states kept in memory; beyond it they go to files (``DriverPlan.spill_folder``)."""
