"""The pipeline stages (SFT, sample + rank, reward model, PPO, evaluation) and the RL maths."""
