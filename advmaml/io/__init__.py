"""Files: safe checkpoints, the safe unpickler, workdir files and locks, TensorBoard scalars, progress lines."""
