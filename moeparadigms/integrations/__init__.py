"""Bridges from the moeparadigms MoE to other continual-learning / training libraries."""
