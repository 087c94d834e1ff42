"""`calbench tune`: Optuna search (being written)."""
