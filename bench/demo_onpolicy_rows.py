"""The on-policy experiment's rows: its methods and the evaluation's row names, shared by
the experiment (bench/demo_onpolicy.py) and its summary (bench/demo_onpolicy_report.py)."""

METHODS = ("skd", "seqkd", "onpolicy", "two_stage", "rounds")
ONPOLICY = ("onpolicy", "two_stage", "rounds")
REFERENCE = "skd"  # the row every other is compared with
TEACHER_ROW = "teacher (Q+E)"
BEFORE_ROW = "student before"
