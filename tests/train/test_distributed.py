"""train.dist: real multi-process runs (gloo DDP and DeepSpeed ZeRO-3 on CPU) against one process.

The worker ``dist_scripts/tiny_train.py`` trains a tiny GPT-2 on one global batch of 8 sequences of
different lengths with the layer's sharding and global-mean loss, then checks generation, a frozen
model and saving. Each configuration is launched once per module and shared by the tests below.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from selfrank.errors import UserError
from selfrank.train import dist
from selfrank.train.models.causal_lm import load_model
from selfrank.train.models.value_model import ValueModel
from selfrank.train.models.policy_value import PolicyAndValue

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "dist_scripts" / "tiny_train.py"
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": 1,
    # Every parameter sharded (the default keeps small ones whole on every rank), and the 16-bit
    # consolidated save path of accelerate enabled (fp32 here: it gathers the weights as they are).
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "steps_per_print": 1_000_000,
}
# Measured (AdamW, 3 steps + clipping at 1.0): DDP 2 procs vs 1 proc <= 2e-7 relative; ZeRO-3 <= 1e-7.
DDP_RTOL = 1e-5
ZERO3_RTOL = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")))
    env.pop("ACCELERATE_USE_CPU", None)
    env.update(extra)
    return env


def launch_cmd(kind: str, out: Path, *worker_args: str, ds_config: Path | None = None) -> tuple[list[str], dict]:
    """Command and environment for a 2-process run: ``ddp`` (gloo) or ``zero3`` (DeepSpeed)."""
    common = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    if kind == "ddp":
        # On CPU, accelerate needs both: ACCELERATE_USE_CPU for gloo, --multi_gpu for a real process group.
        return ([ACCELERATE, "launch", "--multi_gpu", *common, str(WORKER), "--out", str(out), *worker_args],
                worker_env(ACCELERATE_USE_CPU="1"))
    # DeepSpeed must not see ACCELERATE_USE_CPU (accelerate would then drop DeepSpeed).
    return ([ACCELERATE, "launch", "--use_deepspeed", "--deepspeed_config_file", str(ds_config), *common,
             str(WORKER), "--out", str(out), *worker_args], worker_env())


def start(cmd: list[str], env: dict, log: Path) -> tuple[subprocess.Popen, float]:
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO), time.monotonic()


def finish(proc: subprocess.Popen, log: Path, timeout: float, expect_ok: bool = True) -> tuple[int, float, str]:
    """Wait for ``proc`` (killing its group on timeout); returns (exit code, seconds, output)."""
    started = time.monotonic()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"launch hung for more than {timeout} s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    if expect_ok:
        assert rc == 0, f"worker failed (rc {rc}):\n{text[-4000:]}"
    return rc, time.monotonic() - started, text


def read(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "result.json").read_text()), load_file(str(out / "tensors.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One 1-process run (no launcher), one DDP run (2 procs, 2 accumulation steps), one ZeRO-3 run."""
    root = tmp_path_factory.mktemp("dist")
    ds_config = root / "ds.json"
    ds_config.write_text(json.dumps(DS_CONFIG))
    # All three at once: most of their time is start-up (imports, rendezvous), not compute.
    single, _ = start([sys.executable, str(WORKER), "--out", str(root / "single")], worker_env(), root / "single.log")
    ddp, _ = start(*launch_cmd("ddp", root / "ddp", "--grad-accum", "2"), root / "ddp.log")
    zero3, _ = start(*launch_cmd("zero3", root / "zero3", ds_config=ds_config), root / "zero3.log")
    for proc, name in ((single, "single"), (ddp, "ddp"), (zero3, "zero3")):
        finish(proc, root / f"{name}.log", 600)
    return {name: (root / name, *read(root / name)) for name in ("single", "ddp", "zero3")}


def rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference of the global losses of two runs (3 steps, then 1 after generating)."""
    a, b = a["losses"] + [a["loss_after_generation"]], b["losses"] + [b["loss_after_generation"]]
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_ddp_two_processes_follow_the_one_process_trajectory(runs):
    _, one, one_t = runs["single"]
    _, two, two_t = runs["ddp"]
    assert two["world_size"] == 2 and two["distributed_type"] == "DistributedType.MULTI_CPU"
    assert two["grad_accum"] == 2 and one["grad_accum"] == 1
    assert len(two["losses"]) == 3 and rel_diff(one, two) < DDP_RTOL
    assert one["losses"][-1] < one["losses"][0]  # it trains
    # Every example handled exactly once, in order, across ranks; metrics gathered from all ranks.
    assert two["gathered_shards"] == one["gathered_shards"]
    assert two["gathered_ranks"] == [0, 1] and two["mean_rank"] == pytest.approx(0.5)
    assert two["seeds"][0] == 7 and len(set(two["seeds"])) == 2
    torch.testing.assert_close(two_t["final_logits"], one_t["final_logits"], rtol=1e-4, atol=1e-4)
    assert two["trained_text_gathered"] == one["trained_text_gathered"] == two["trained_text_sharded"]


@pytest.mark.slow
def test_zero3_two_processes_follow_the_one_process_trajectory(runs):
    _, one, one_t = runs["single"]
    _, z3, z3_t = runs["zero3"]
    assert z3["world_size"] == 2 and z3["distributed_type"] == "DistributedType.DEEPSPEED"
    assert z3["zero_stage"] == 3
    assert rel_diff(one, z3) < ZERO3_RTOL
    assert z3["gathered_shards"] == one["gathered_shards"] and z3["gathered_ranks"] == [0, 1]
    torch.testing.assert_close(z3_t["final_logits"], one_t["final_logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_zero3_generation_gathered_and_sharded_agree_with_one_process(runs):
    _, one, _ = runs["single"]
    _, z3, _ = runs["zero3"]
    assert z3["trained_text_gathered"] == one["trained_text_gathered"]
    assert z3["trained_text_sharded"] == z3["trained_text_gathered"]
    assert z3["final_text"] == one["final_text"]
    # Prefix-shared sampling with sharded weights and uneven work per rank (synced forwards).
    assert z3["sampled_text_gathered"] == one["sampled_text_gathered"] == one["sampled_text_sharded"]
    assert z3["sampled_text_sharded"] == z3["sampled_text_gathered"] and z3["sampled_synced"]


@pytest.mark.slow
def test_zero3_frozen_model_is_sharded_and_gives_unsharded_logits(runs):
    _, one, one_t = runs["single"]
    _, z3, z3_t = runs["zero3"]
    assert one["frozen_local_numel"] == one["frozen_full_numel"]
    # Each of the 2 ranks holds half of the weights (ZeRO pads partitions to equal sizes).
    assert z3["frozen_full_numel"] == one["frozen_full_numel"]
    assert z3["frozen_local_numel"] <= z3["frozen_full_numel"] // 2 + 64
    assert not z3["frozen_requires_grad"]
    torch.testing.assert_close(z3_t["frozen_logits"], one_t["frozen_logits"], rtol=1e-5, atol=1e-5)
    assert z3["frozen_text"] == one["frozen_text"]


@pytest.mark.slow
def test_zero3_saved_folder_loads_in_one_process(runs):
    folder, z3, z3_t = runs["zero3"]
    model, tokenizer = load_model(folder / "model")
    assert any((folder / "model").glob("*.safetensors"))
    model.eval()
    from tests.train.dist_scripts.tiny_train import PROMPTS, probe_inputs
    from selfrank.train.sampling.generation import generate

    ids, mask = probe_inputs(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, z3_t["final_logits"], rtol=1e-5, atol=1e-5)
    assert generate(model, tokenizer, PROMPTS, do_sample=False, max_new_tokens=6).texts == z3["final_text"]
    torch.testing.assert_close(model.transformer.wte.weight.detach(), z3_t["state_wte"], rtol=0, atol=0)
    assert z3["state_dict_keys"] == runs["single"][1]["state_dict_keys"]


@pytest.mark.slow
def test_dead_or_stalled_rank_fails_the_job_instead_of_hanging(tmp_path):
    """SIGKILL of rank 1: the launcher stops the job at once. Rank 1 asleep: rank 0's collective times out
    after SELFRANK_DIST_TIMEOUT seconds and the job fails."""
    kill_cmd, kill_env = launch_cmd("ddp", tmp_path / "kill", "--fail", "kill")
    stall_cmd, stall_env = launch_cmd("ddp", tmp_path / "stall", "--fail", "stall")
    kill_env.pop(dist.TIMEOUT_ENV, None)  # default 600 s: a death must be noticed long before that
    stall_env[dist.TIMEOUT_ENV] = "8"
    killed, _ = start(kill_cmd, kill_env, tmp_path / "kill.log")
    stalled, _ = start(stall_cmd, stall_env, tmp_path / "stall.log")
    rc_kill, _, text_kill = finish(killed, tmp_path / "kill.log", 400, expect_ok=False)
    rc_stall, _, text_stall = finish(stalled, tmp_path / "stall.log", 400, expect_ok=False)
    assert rc_kill != 0 and not (tmp_path / "kill" / "result.json").exists(), text_kill[-2000:]
    assert rc_stall != 0 and not (tmp_path / "stall" / "result.json").exists(), text_stall[-2000:]
    # gloo reports the configured timeout: the environment variable reached the process group.
    assert "timed out waiting 8000ms" in text_stall.lower(), text_stall[-2000:]


# ---------------------------------------------------------------------------------------------------------
# One process (no launcher): the same API degenerates to plain single-process code.

def test_shard_bounds_cover_every_item_once_and_reject_uneven_batches():
    seen = [i for r in range(4) for i in range(*dist.shard_bounds(12, r, 4))]
    assert seen == list(range(12))
    with pytest.raises(UserError, match="not divisible by the number of processes"):
        dist.shard_bounds(10, 0, 4)
    with pytest.raises(ValueError):
        dist.shard_bounds(8, 2, 2)


def test_timeout_from_environment(monkeypatch):
    monkeypatch.delenv(dist.TIMEOUT_ENV, raising=False)
    assert dist.dist_timeout().total_seconds() == dist.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(dist.TIMEOUT_ENV, "7.5")
    assert dist.dist_timeout().total_seconds() == 7.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv(dist.TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=dist.TIMEOUT_ENV):
            dist.dist_timeout()


def test_frozen_zero3_config_drops_training_parts():
    source = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8, "bf16": {"enabled": True},
              "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}, "overlap_comm": True}}
    config = dist.frozen_zero3_config(source, offload=True)
    assert config["zero_optimization"] == {"stage": 3, "overlap_comm": True,
                                           "offload_param": {"device": "cpu", "pin_memory": torch.cuda.is_available()}}
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 1
    assert config["bf16"] == {"enabled": True} and "optimizer" not in config and "scheduler" not in config
    assert source["zero_optimization"]["stage"] == 2  # the job's config is untouched
    assert "offload_param" not in dist.frozen_zero3_config(source)["zero_optimization"]


def test_single_process_layer(tmp_path):
    from tests.train.helpers import tiny_policy
    from selfrank.train.models.causal_lm import save_model

    acc = dist.get_accelerator()
    assert dist.get_accelerator() is acc and acc.num_processes == 1
    assert dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    assert dist.shard_batch(list("abcd"), acc) == list("abcd") and dist.per_rank_seed(5, acc) == 5
    loss_sum = torch.tensor(6.0, requires_grad=True)
    loss = dist.global_mean_loss(loss_sum, torch.tensor(4), acc)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert loss_sum.grad.item() == pytest.approx(0.25)
    assert dist.reduce_mean(3.0, acc) == 3.0 and dist.gather_lists([1, 2]) == [1, 2]

    policy, tokenizer = tiny_policy(seed=0)
    value = ValueModel(policy.transformer, nn.Linear(policy.config.n_embd, 1))
    both = PolicyAndValue(policy, value)
    ids = torch.tensor([tokenizer("a b c")["input_ids"]])
    logits, values = both(ids, torch.ones_like(ids))
    assert logits.shape == (1, ids.shape[1], policy.config.vocab_size) and values.shape == ids.shape
    model, _ = dist.prepare_trainable(acc, both, torch.optim.SGD(both.parameters(), lr=0.1))
    with dist.gathered_for_generation(model, acc) as inner:
        assert inner is both
    assert dist.generation_kwargs(model, acc, gather=False) == {}

    frozen = dist.prepare_frozen(tiny_policy(seed=1)[0], acc)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    state = dist.full_state_dict(frozen, acc)
    assert set(state) == set(frozen.state_dict())
    dist.save_full(frozen, acc, lambda m: save_model(m, tokenizer, tmp_path / "m"))
    loaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(loaded.transformer.wte.weight, frozen.transformer.wte.weight)


def test_shutdown_destroys_the_process_group_and_is_a_no_op_without_one(tmp_path):
    dist.shutdown()  # none yet: nothing to do
    assert not torch.distributed.is_initialized()
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert torch.distributed.is_initialized()
        dist.shutdown()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
