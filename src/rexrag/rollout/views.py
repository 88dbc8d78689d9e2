"""A trajectory's text views: what rewards, evaluation and display read of the token record.

Each view decodes by segment kind (``rexrag.rollout.trajectory.Seg``), never by matching patterns in
decoded text: the model's own runs (POLICY, PROBE) are told apart from what the system inserted
(INFO passages, NOTICEs), so a retrieved passage that quotes tags can neither answer for the model,
pay a reward, nor break or fake the response's format. They live with the trajectory rather than the
agent that builds it so that rewards and the config they are checked by need no agent.
"""

from __future__ import annotations

from rexrag.protocol import INFO_CLOSE, INFO_OPEN, last_answer_span
from rexrag.rollout.trajectory import Seg, Trajectory


def response_text(tokenizer, traj: Trajectory, include_notices: bool = False) -> str:
    """Decode of the response (for rewards and display; never re-tokenised for training).

    NOTICE text is left out by default: it is ours, not the model's, and it quotes the tags
    (``<answer> answer </answer>``), so a reward reading it would score our words.
    """
    drop = {Seg.PROMPT} if include_notices else {Seg.PROMPT, Seg.NOTICE}
    ids = [t for t, s in zip(traj.token_ids, traj.segments) if s not in drop]
    return tokenizer.decode(ids, skip_special_tokens=True)


def policy_text(tokenizer, traj: Trajectory) -> str:
    """The model's own response text, what rewards read: its POLICY and PROBE runs, each decoded on its
    own and joined. No prompt, no retrieved INFO text and no NOTICE, so a reward that looks for the gold
    answer in the text cannot be paid by a passage the retriever found."""
    return "".join(tokenizer.decode(ids, skip_special_tokens=True) for seg, ids in _runs(traj)
                   if seg in (Seg.POLICY, Seg.PROBE))


def _runs(traj: Trajectory) -> list[tuple[int, list[int]]]:
    """Consecutive runs of one segment kind after the prompt: ``[(seg, ids), ...]``."""
    runs: list[tuple[int, list[int]]] = []
    for tid, seg in zip(traj.token_ids[traj.prompt_len :], traj.segments[traj.prompt_len :]):
        if runs and runs[-1][0] == seg:
            runs[-1][1].append(tid)
        else:
            runs.append((seg, [tid]))
    return runs


def policy_answer(tokenizer, traj: Trajectory) -> str | None:
    """The model's answer, read from its own tokens: the stripped text of the last complete
    ``<answer>...</answer>`` inside one run of POLICY tokens, else None.

    Runs are decoded one by one, so retrieved passages (INFO), our notices (NOTICE) and probe prompts
    (PROBE) can neither supply an answer nor join two pieces of model text into one: a passage that
    quotes ``</information><answer>X</answer>`` is never the answer. An empty or whitespace-only
    ``<answer></answer>`` is no answer (None). This is what rewards and evaluation score; it agrees
    with ``traj.answer`` as the agent sets it (from the answering turn's ids).
    """
    if traj.meta.get("format") == "tool_calls":  # set by the agent from the final message's sampled ids
        return traj.answer
    for seg, ids in reversed(_runs(traj)):
        if seg != Seg.POLICY:
            continue
        text = tokenizer.decode(ids, skip_special_tokens=True)  # as response_text decodes
        span = last_answer_span(text)
        if span is not None:
            return text[span[0] : span[1]].strip() or None
    return None


def format_view(tokenizer, traj: Trajectory) -> str:
    """The response as the format check (``rexrag.rewards.format_ok``) should read it.

    The model's and the probe's tokens are decoded as they are, notices are left out (as in
    ``response_text``), and every run of retrieved tokens becomes an empty
    ``<information></information>`` block: the check never looks inside a retrieved block, so a
    passage that quotes tags can neither break nor fake the response's format.
    """
    parts, pending = [], []
    for seg, ids in _runs(traj):
        if seg == Seg.INFO:
            parts.append(tokenizer.decode(pending, skip_special_tokens=True))
            parts.append(INFO_OPEN + INFO_CLOSE)
            pending = []
        elif seg != Seg.NOTICE:
            pending += ids
    parts.append(tokenizer.decode(pending, skip_special_tokens=True))
    return "".join(parts)
