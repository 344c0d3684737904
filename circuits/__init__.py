"""Circuit discovery on the model's graph. Imports `workbench` and `sae` only."""
