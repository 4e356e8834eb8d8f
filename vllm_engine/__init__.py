"""Every use of vLLM in kdshards, and the only package that imports it.

The teacher backend of precompute and its logprob arrays, the on-policy student engine, the
teacher server and its client's protocol, and the CPU KV-cache default live here; everything
else asks this package. A vLLM upgrade touches this package and its tests only.
"""
