"""A training run: assembly, state, the epoch loop (fit), callbacks, the checkpoint schema, the run directory,
epoch selection, the test split, the LR range test."""
