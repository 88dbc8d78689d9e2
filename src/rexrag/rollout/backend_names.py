"""The generation backends' registry and its choices, readable without importing any engine.

``rexrag.config`` checks ``rollout.backend`` against :func:`backend_choices`; the builders themselves
(``rexrag.rollout.backends``) import the engines, the models and through them the config, so the
shipped ones are registered here by dotted path and imported when a backend is first built.
A builder registered with ``BACKENDS.register`` (or ``rexrag.rollout.backends.BACKENDS``, the same
object) is a choice as soon as it is registered.
"""

from __future__ import annotations

from collections.abc import Callable

from rexrag.registry import Registry

BackendBuilder = Callable[..., object]
BACKENDS: Registry[BackendBuilder] = Registry("generation backend")
AUTO = "auto"
BACKENDS.add_lazy("hf", "rexrag.rollout.backends:_build_hf")
BACKENDS.add_lazy("vllm", "rexrag.rollout.backends:_build_vllm")


def backend_choices() -> list[str]:
    return [AUTO, *BACKENDS.names()]
