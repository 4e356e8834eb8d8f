"""python -m tools.eval: see tools/eval/run.py; python -m tools.eval agent: tools/eval/agent.py."""

import sys

if __name__ == "__main__":  # vLLM spawns processes that re-import __main__
    if sys.argv[1:2] == ["agent"]:
        from tools.eval.agent import main

        raise SystemExit(main(sys.argv[2:]))
    from tools.eval.run import main

    raise SystemExit(main())
