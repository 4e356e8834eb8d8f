"""The agent demo's rows: its methods and the evaluation's row names, shared by the demo
(bench/demo_agent.py) and its summary (bench/demo_agent_report.py)."""

METHODS = ("skd", "seqkd", "onpolicy", "rounds")
ONPOLICY = ("onpolicy", "rounds")
TEACHER_ROW = "teacher + experience"
BEFORE_ROW = "student before"
REFERENCE = BEFORE_ROW  # the evaluation's reference row: every model against the student before
SKD = "skd"  # the on-policy variants are also compared with it (in the summary)
