"""Shipped run configurations (installed as `genesis.configs` so `--config NAME.toml` works from anywhere)."""
