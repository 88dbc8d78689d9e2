"""Token-exact multi-turn search rollouts: the trajectory record, generation backends, the agent loop.

The names below load on first access (PEP 562): importing one light submodule (``rollout.trajectory``,
``rollout.backend_names``, ``rollout.tool_calls``) must not start the agent and the engines, which
import the models and through them the config that reads those submodules.
"""

from __future__ import annotations

from rexrag.registry import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
