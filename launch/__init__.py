"""The front door: command line, config loading, accelerate/DeepSpeed wiring, SLURM, tracking."""
