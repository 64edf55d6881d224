"""Compression policies: scorers, allocators, reducers, budgets, and the config that names them (pure torch)."""
