"""Where compiled models run: the local Relax VM and the reference executions."""
