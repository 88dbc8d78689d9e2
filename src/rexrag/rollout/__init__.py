"""Token-exact multi-turn search rollouts: the trajectory record, generation backends, the agent loop."""

from rexrag.rollout.agent import SearchAgent, response_text
from rexrag.rollout.engine import GenerationBackend, GenOutput, HFBackend, SamplingParams
from rexrag.rollout.trajectory import Seg, Trajectory, from_batch, loss_mask_for, to_batch

__all__ = [
    "GenOutput", "GenerationBackend", "HFBackend", "SamplingParams", "SearchAgent", "Seg", "Trajectory",
    "from_batch", "loss_mask_for", "response_text", "to_batch",
]
