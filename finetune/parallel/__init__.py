"""Several processes: launch (torchrun), process signals, DDP/FSDP2 wrapping, sharded checkpoints."""
