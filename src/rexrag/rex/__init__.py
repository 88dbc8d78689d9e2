"""REX-RAG: mixed sampling with probe trajectories and policy correction.

- ``pool``: the exploratory prompt pool (bundled 30 prompts or a user file) and its prefix trie.
- ``probe``: probe sources (per_trajectory / dead_end_group), probe construction, top-K filter, adaptive rho.
- ``correction``: behaviour log-probs (rex_token), sequence weights (rex_sequence) or none.
- ``explorer``: ``RexExplorer``, the trainer hook (explore / correct / end_step).
"""
