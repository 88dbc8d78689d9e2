"""Tests for rexrag.warmup: token-exact trajectories, loss masking, training, checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from rexrag.config import ModelConfig
from rexrag.data import QAExample
from rexrag.prompts import build_prompt_ids
from rexrag.retrieval.base import Passage
from rexrag.rollout.trajectory import Seg, to_batch
from rexrag import warmup


class FakeRetriever:
    """Deterministic retriever: titles are word pairs of the query, the last one is "Extra page"."""

    def __init__(self):
        self.calls = []

    def search(self, queries, k):
        self.calls.append(list(queries))
        out = []
        for q in queries:
            words = q.split()
            titles = [" ".join(words[i : i + 2]) for i in range(k - 1)] + ["Extra page"]
            hits = [Passage(f"p{i}", t, f"Text about {q} number {i}.", 1.0 / (i + 1)) for i, t in enumerate(titles)]
            out.append(hits)
        return out


def _examples():
    return [
        QAExample("a", "Who directed the film Jaws?", ["Steven Spielberg"], 0, "t",
                  {"supporting_titles": ["Jaws (film)", "Who directed"]}),
        QAExample("b", "Which river flows through Paris?", ["Seine"], 1, "t", {}),
        QAExample("c", "What year did Apollo 11 land?", ["1969"], 2, "t", {"supporting_titles": ["What year"]}),
    ]


def test_trajectory_is_token_exact_with_masked_info(smol_tokenizer):
    tok = smol_tokenizer
    cfg = warmup.WarmupConfig(n_examples=0, topk=2)
    trajs = warmup.build_warmup_trajectories(tok, FakeRetriever(), _examples(), cfg)
    t0 = trajs[0]
    # prompt is exactly build_prompt_ids; segments: PROMPT, POLICY, INFO, POLICY, INFO, POLICY
    prompt = build_prompt_ids(tok, _examples()[0].question)
    assert t0.token_ids[: len(prompt)] == prompt and t0.prompt_len == len(prompt)
    runs = [s for i, s in enumerate(t0.segments) if i == 0 or s != t0.segments[i - 1]]
    assert runs == [Seg.PROMPT, Seg.POLICY, Seg.INFO, Seg.POLICY, Seg.INFO, Seg.POLICY]
    assert t0.n_searches == 2  # "Jaws (film)" was not among the first hits -> second hop
    text = tok.decode(t0.token_ids[len(prompt):])
    assert "<search> Who directed the film Jaws </search>" in text
    assert "<search> Jaws (film) </search>" in text
    assert text.endswith("<answer> Steven Spielberg </answer>")
    info = tok.decode([i for i, s in zip(t0.token_ids, t0.segments) if s == Seg.INFO])
    assert info.startswith("\n\n<information>Doc 1(Title: \"Who directed\")") and "</information>" in info
    assert "<search>" not in info and "<answer>" not in info
    # example c: its only supporting title was found by the first search -> one hop
    assert trajs[2].n_searches == 1
    # example b: no metadata -> title of a retrieved passage the question does not name
    assert trajs[1].n_searches == 2
    assert "<search> Extra page </search>" in tok.decode(trajs[1].token_ids)
    mask = to_batch(trajs, tok.pad_token_id)["loss_mask"]
    segs = to_batch(trajs, tok.pad_token_id)["segments"]
    assert torch.equal(mask.bool(), segs == Seg.POLICY)


def test_info_block_matches_the_agent_insertion(smol_tokenizer):
    from rexrag.protocol import INFO_CLOSE, INFO_OPEN
    from rexrag.retrieval import format_information

    tok = smol_tokenizer
    p = [Passage("x", "T", "word " * 400), Passage("y", "U", "short")]
    ids = warmup.info_ids(p, tok, max_obs_tokens=20)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    assert ids == enc(INFO_OPEN) + enc(format_information(p))[:20] + enc(INFO_CLOSE)
    assert len(warmup.info_ids(p, tok, max_obs_tokens=10_000)) == len(enc(INFO_OPEN)) + len(enc(format_information(p))) + len(enc(INFO_CLOSE))


def test_info_tokens_get_no_gradient(smol_tokenizer, tiny_model):
    tok = smol_tokenizer
    trajs = warmup.build_warmup_trajectories(tok, FakeRetriever(), _examples()[:1], warmup.WarmupConfig(topk=2))
    batch = to_batch(trajs, tok.pad_token_id, train_probe_tokens=False)
    emb = tiny_model.get_input_embeddings()
    captured = {}

    def hook(_m, _inp, out):
        out.retain_grad()
        captured["e"] = out
    handle = emb.register_forward_hook(hook)
    loss = warmup.nll_loss(tiny_model, batch)
    loss.backward()
    handle.remove()
    g = captured["e"].grad[0].abs().sum(-1)  # [T] gradient reaching each input position
    segs = batch["segments"][0]
    # The last INFO token predicts the first token of the next POLICY run, so it does receive
    # gradient as *context*; but no loss term is on an INFO *target*: changing INFO targets'
    # log-probs cannot change the loss. Check the loss equals the POLICY-only NLL exactly.
    from rexrag.models import sequence_logprobs
    lp = sequence_logprobs(tiny_model, batch["input_ids"], batch["attention_mask"])[0]
    policy = segs == Seg.POLICY
    assert loss.item() == pytest.approx(-(lp[policy].mean()).item(), rel=1e-5)
    assert g.shape[0] == segs.shape[0] and g[policy].sum() > 0


def test_finetune_lowers_target_loss_and_checkpoint_loads(smol_tokenizer, tiny_model, tmp_path):
    from rexrag.models import load_model

    tok = smol_tokenizer
    cfg = warmup.WarmupConfig(n_examples=0, steps=5, batch_size=2, lr=1e-2, topk=1, max_obs_tokens=12)
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    full = to_batch(warmup.build_warmup_trajectories(tok, FakeRetriever(), _examples(), cfg), tok.pad_token_id)
    with torch.no_grad():
        nll_before = warmup.nll_loss(tiny_model, full).item()
    summary = warmup.run_warmup(tiny_model, tok, FakeRetriever(), _examples(), cfg, tmp_path / "ckpt", quiet=True)
    with torch.no_grad():
        nll_after = warmup.nll_loss(tiny_model, full).item()
    assert len(summary["losses"]) == 5 and nll_after < 0.85 * nll_before
    assert any(not torch.equal(before[n], p) for n, p in tiny_model.named_parameters())
    ckpt = tmp_path / "ckpt"
    assert json.loads((ckpt / "warmup.json").read_text())["trajectories"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    loaded = load_model(ModelConfig(name_or_path=str(ckpt)))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, tiny_model(ids).logits, atol=1e-5)


def test_config_validation():
    with pytest.raises(Exception, match="second_hop"):
        warmup.WarmupConfig(second_hop="sometimes")
    with pytest.raises(Exception, match="at least one"):
        warmup.build_warmup_trajectories(None, FakeRetriever(), [], warmup.WarmupConfig())


def test_warmup_cli_writes_a_checkpoint_eval_accepts(smol_tokenizer, tiny_model, tmp_path, capsys):
    from rexrag.cli import main
    from rexrag.retrieval import build_index

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "contents": f'"Film {i}"\nFilm {i} was directed by someone.'}) + "\n"
                              for i in range(6)))
    build_index(corpus, "bm25", tmp_path / "idx")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"id": e.id, "question": e.question, "golden_answers": e.golden_answers}) + "\n"
                          for e in _examples()))
    tiny_model.save_pretrained(tmp_path / "base")
    smol_tokenizer.save_pretrained(tmp_path / "base")
    rc = main(["warmup", "--model", str(tmp_path / "base"), "--train-file", str(qa), "--index", str(tmp_path / "idx"),
               "--n-examples", "2", "--steps", "2", "--batch-size", "1", "--topk", "1", "--max-obs-tokens", "8",
               "--out", str(tmp_path / "warm")])
    assert rc == 0 and "warm-up: 2 trajectories" in capsys.readouterr().out
    assert (tmp_path / "warm" / "config.json").is_file() and (tmp_path / "warm" / "tokenizer_config.json").is_file()
    rc = main(["eval", "--backend", "hf", "--model", str(tmp_path / "warm"), "--dataset", f"qa={qa}", "--index", str(tmp_path / "idx"),
               "--method", "agent", "--max-turns", "1", "--max-new-tokens", "3", "--out", str(tmp_path / "ev")])
    assert rc == 0 and json.loads((tmp_path / "ev" / "metrics.json").read_text())["datasets"]["qa"]["n"] == 3


def test_gradient_checkpointing_changes_no_number(smol_tokenizer):
    """The demo warms up with checkpointing to save memory: same losses and weights, bit for bit (fp32 CPU)."""
    from rexrag.models import tiny_llama

    tok = smol_tokenizer
    trajs = warmup.build_warmup_trajectories(tok, FakeRetriever(), _examples(),
                                             warmup.WarmupConfig(n_examples=0, topk=1, max_obs_tokens=12))
    runs = []
    for ckpt in (False, True):
        model = tiny_llama(len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
        cfg = warmup.WarmupConfig(steps=3, batch_size=2, lr=1e-2, gradient_checkpointing=ckpt)
        runs.append((warmup.finetune(model, tok, trajs, cfg, quiet=True), model.state_dict()))
    (loss_a, sd_a), (loss_b, sd_b) = runs
    assert loss_a == loss_b
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
