"""Commands beside training: the probe lab, export."""
