"""Cross-tokenizer distillation: aligning a teacher's tokens with a student's on the same text,
chain-rule span probabilities, and the teacher-to-student vocabulary map (docs/cross-tokenizer.md).

A leaf package: it imports shards (for tokenizer fingerprints) and nothing else of the project,
so that precompute/, train/ and tools/ can all import it.
"""
