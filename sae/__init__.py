"""Sparse dictionaries learned on cached activations (SAEs, codebooks, probes). Imports `workbench` only."""
