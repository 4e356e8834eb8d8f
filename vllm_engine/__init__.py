"""Every use of vLLM in kdshards, and the only package that imports it.

The teacher backend of precompute (teacher.py) and its logprob arrays (arrays.py, topk.py),
plain generation for evaluation (generate.py), the on-policy student engine (student.py), the
teacher server and its client's protocol, the CPU KV-cache default (env.py), the engine
arguments each device needs (engine_args.py) and the tested vLLM versions (version.py) live
here; everything else asks this package. A vLLM upgrade touches this package and its tests
only (tests/test_vllm_engine.py; tests/test_import_graph.py keeps vLLM imports here). It
imports nothing from precompute/, train/ or tools/.
"""
