"""Gymnasium environments that wrap the shared student loop (installed as metagate.envs)."""
