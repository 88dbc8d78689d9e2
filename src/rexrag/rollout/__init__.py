"""Token-exact multi-turn search rollouts: the trajectory record, generation backends, the agent loop.

The names below load on first access (PEP 562): importing one light submodule (``rollout.trajectory``,
``rollout.backend_names``, ``rollout.tool_calls``) must not start the agent and the engines, which
import the models and through them the config that reads those submodules.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "SearchAgent": "rexrag.rollout.agent",
    "response_text": "rexrag.rollout.views",
    "GenerationBackend": "rexrag.rollout.engine",
    "GenOutput": "rexrag.rollout.engine",
    "HFBackend": "rexrag.rollout.engine",
    "SamplingParams": "rexrag.rollout.engine",
    "Seg": "rexrag.rollout.trajectory",
    "Trajectory": "rexrag.rollout.trajectory",
    "from_batch": "rexrag.rollout.trajectory",
    "loss_mask_for": "rexrag.rollout.trajectory",
    "to_batch": "rexrag.rollout.trajectory",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0604 (the lazy names above)


def __getattr__(name: str):
    """Import ``name``'s module on first access and cache the attribute here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rexrag.rollout' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
