"""On-policy distillation jobs: live (a teacher server beside the trainer) and rounds
(on-policy as data), both run by tools/stages.py."""
