"""python -m tools.eval: see tools/eval/run.py."""

from tools.eval.run import main

if __name__ == "__main__":  # vLLM spawns processes that re-import __main__
    raise SystemExit(main())
