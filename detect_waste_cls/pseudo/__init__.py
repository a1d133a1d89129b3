"""Pseudo-labeling: the loss arithmetic (loss.py), the label store (store.py) and the refresh callback (callbacks.py)."""
