"""Triton kernels, installed as `genesis.kernels` (one op per file; the pure-torch twin lives in genesis/)."""
