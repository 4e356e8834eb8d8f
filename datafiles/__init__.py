"""Reading users' data files, in the formats Hugging Face and TRL users already have.

precompute/ (the teacher's inputs), train/ (on-policy prompts) and tools/ (eval questions)
read data files the same way through this package: `reading` turns a file (JSONL, JSON,
CSV, Parquet, Arrow, a folder of them, a folder saved by `datasets`) into raw rows, each
with its file and line; `formats` recognises the table's format (TRL's conversational
`messages`, `prompt`/`completion`, kdshards' `question`/`answer`) and maps a row to the
student's chat, the teacher-only experience, the reference answer and the response to
score; `views` renders the student's and the teacher's prompts. It imports nothing from
precompute/, train/, tools/, runtime/ or vllm_engine/.
"""
