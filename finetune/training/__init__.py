"""Training: one step, one epoch, evaluation; optimizers, schedules, freeze plans, losses, precision."""
