"""Attention over the head-block pool, and which kernel implementation a device runs."""
