"""The student's own vLLM engine, colocated in the trainer's process (on-policy sampling).

`VLLMStudent` builds a `vllm.LLM` for the student's model folder with V1 multiprocessing
off (VLLM_ENABLE_V1_MULTIPROCESSING=0): EngineCore and its single worker run in this
process, so there is no server, nothing to serialize, and nothing that outlives the
trainer (a kill -9 of the trainer kills the engine with it).

`push(weights)` copies the trainer's current weights into the engine in place through the
worker's `reload_weights` (vllm/model_executor/model_loader/reload/inplace.py): the
checkpoint-format tensors go through the model's own `load_weights` (stacking q/k/v and
gate/up, repacking for the CPU kernels) into the existing storage; no restart, no disk.
`trainer_weights(lm)` yields those tensors from the trainer's model: merged W + BA for
LoRA, gathered from their partitions under DeepSpeed ZeRO-3.

The weight sync rests on vLLM internals, so the engine refuses a vLLM outside the tested
versions (vllm_engine/version.py); dtype and eager mode follow vllm_engine/engine_args.py.

Memory: on a GPU the engine takes `gpu_memory_utilization` of the device (weights + KV
cache; the trainer needs the rest); on the CPU its KV cache is `cpu_kv_cache_gib`
(VLLM_CPU_KVCACHE_SPACE, when set, wins).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from vllm_engine.engine_args import resolve_engine_args
from vllm_engine.env import KVCACHE_SPACE_VAR
from vllm_engine.version import outside_range


def trainer_weights(lm: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in the Hugging Face checkpoint's names, as the engine loads them.

    A PEFT LoRA model yields each adapted layer's merged weight W + scale * B @ A (the
    trainer's own weights are not touched) and skips the adapter tensors. Under ZeRO-3
    each module's parameters are gathered for the time it takes to copy them.
    """
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    lora = {}
    if base is not lm:
        # peft takes seconds to import: only LoRA students need it, and train imports this module
        from peft.tuners.lora import LoraLayer

        lora = {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}
    zero3 = any(hasattr(p, "ds_id") for p in base.parameters())
    seen: set[int] = set()  # tied weights are listed once, as named_parameters does
    for mod_name, module in base.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for _, p in params)
        owner_name, _, leaf_mod = mod_name.rpartition(".")
        owner = lora.get(owner_name) if leaf_mod == "base_layer" else None
        if mod_name in lora or any(mod_name.startswith(n + ".lora_") for n in lora):
            continue  # the adapter's own tensors (lora_A, lora_B, ...): merged below
        with gathered([p for _, p in params] + _adapter_params(owner), zero3):
            for leaf, p in params:
                t = p.detach()
                if owner is not None and leaf == "weight":
                    t = t + sum(
                        owner.get_delta_weight(a)
                        for a in owner.active_adapters
                        if a in owner.lora_A
                    )
                    name = f"{owner_name}.weight"
                else:
                    name = f"{owner_name}.{leaf}" if owner is not None else _join(mod_name, leaf)
                # Under ZeRO-3 the gathered storage is released on leaving the block; the
                # engine may hold a tensor until its layer is complete.
                yield name, (t.clone() if zero3 else t)


def _join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _adapter_params(owner) -> list:
    return [] if owner is None else [p for n, p in owner.named_parameters() if "lora_" in n]


def gathered(params: list, zero3: bool):
    """DeepSpeed ZeRO-3: the full tensors of `params` on every rank inside the block."""
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed  # optional: ZeRO-3 runs on GPUs only

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _reprocess_tied_heads(model: torch.nn.Module) -> int:
    """An output head tied to the embeddings gets no weights of its own in a reload, so
    vLLM does not re-run its post-load processing; on the CPU that processing packs the
    weight for oneDNN, and the old packed copy would keep computing the logits."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
    for head in heads:
        head.quant_method.process_weights_after_loading(head)
    return len(heads)


class VLLMStudent:
    """A vLLM engine for the student in this process (see the module docstring)."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str,
        max_model_len: int,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        cpu_kv_cache_gib: float = 1.0,
        max_logprobs: int = 20,
        distributed: bool = False,
    ):
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:
            raise RuntimeError(
                f"onpolicy.sampler=vllm needs vLLM installed ({e}); use onpolicy.sampler=hf"
            ) from e
        import vllm.envs

        # push() goes through vLLM internals (the worker's reload_weights, the output head's
        # post-load processing) that change between releases: refuse an untested vLLM
        # rather than sample from stale weights.
        reason = outside_range()
        if reason:
            raise RuntimeError(
                f"onpolicy.sampler=vllm pushes weights through vLLM internals: {reason} "
                "(vllm_engine/version.py); install a tested vLLM or use onpolicy.sampler=hf"
            )
        cpu = current_platform.is_cpu()
        # The device's defaults for what the trainer leaves unset (dtype: the trainer's;
        # eager mode: on for the CPU, whose compiling costs more start-up than it saves).
        args = resolve_engine_args({"dtype": dtype}, current_platform)
        args |= {
            "model": str(model),
            "max_model_len": max_model_len,
            "seed": seed,
            "max_logprobs": max_logprobs,
            "logprobs_mode": "raw_logprobs",
            # Whole prompts in one prefill: vLLM 0.32 on the CPU cannot rewind a seeded
            # request's generator after a partial prefill, and samples are seeded per request.
            "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(max_model_len, 2048),
            "gpu_memory_utilization": gpu_memory_utilization,
        }
        if cpu and not os.environ.get(KVCACHE_SPACE_VAR):  # the variable, when set, wins
            args["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * (1 << 30))
        if distributed:  # one engine per rank, in the ranks' own torch.distributed world
            args["distributed_executor_backend"] = "external_launcher"
        saved_env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        set_num_threads = torch.set_num_threads
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            self.llm = LLM(**args)
        finally:
            # The in-process engine freezes vLLM's environment cache and replaces
            # torch.set_num_threads (its CPU worker's thread binding): both belong to the
            # trainer's process, so undo them.
            if saved_env is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved_env
            # Where a vLLM has no environment cache, there is none to undo.
            disable_envs_cache = getattr(vllm.envs, "disable_envs_cache", None)
            if disable_envs_cache is not None:
                disable_envs_cache()
            torch.set_num_threads = set_num_threads
        self.max_model_len = max_model_len

    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: list[int],
        stop_ids: list[int],
    ) -> list[list[int]]:
        """One sample per (prompt, seed): the generated token ids, the stop token kept."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=1,
                seed=seed,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_tokens=m,
                stop_token_ids=stop_ids,
                detokenize=False,
            )
            for seed, m in zip(seeds, max_new_tokens, strict=True)
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        return [list(o.outputs[0].token_ids) for o in outs]

    def token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(ids[j] | ids[:j]) for j >= 1 under the engine's current weights. Shape: (T-1,)"""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids))], params, use_tqdm=False)
        entries = out[0].prompt_logprobs[1:]
        return torch.tensor([e[t].logprob for e, t in zip(entries, ids[1:], strict=True)])

    @torch.no_grad()
    def push(self, weights) -> None:
        """Copy (name, tensor) pairs into the engine's model in place."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.apply_model(_reprocess_tied_heads)
        # Cached prompt KV blocks were computed with the old weights.
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
