"""Paradigm LightningModules built on the MoE core."""
