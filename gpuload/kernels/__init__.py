"""Batch-producing kernels: a plain-torch reference for each, and the fast implementations held to it."""
