"""Text-game environments for agent distillation: the interface (base.py), its config
(config.py), the TextWorldExpress adapter (textworld.py, Java found by java.py), THE prompt
format (prompt.py), THE action-parsing rule (actions.py) and the batch runner (runner.py)
that steps many episodes together so an engine sees one batch per step.

precompute/, train/ and tools/ all use this package; it imports none of them (only the
shared kernel runtime/), so they stay apart (tests/test_import_graph.py).
"""
