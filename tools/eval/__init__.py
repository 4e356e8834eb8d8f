"""Held-out evaluation: generation per model, scorers, sandboxed code runner, report."""
