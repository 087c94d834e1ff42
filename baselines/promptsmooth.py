"""PromptSmooth baselines (being written)."""
