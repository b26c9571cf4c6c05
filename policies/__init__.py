"""Gate policies: stable-baselines3 and plain torch (installed as metagate.policies)."""
