"""The SFT and reward stages under real multi-process launches, and the whole pipeline under accelerate.

``dist_scripts/stage_train.py`` runs the real ``train_sft`` and ``train_reward`` on one prepared tiny
world (policy without dropout, preference pairs). It is launched once with no launcher, once as 2
processes of plain DDP (gloo, SFT with 2 accumulation steps per process) and once as 2 processes of
DeepSpeed ZeRO-3, all at once (start-up dominates). The ZeRO-3 job is cut short (SFT after 3 of 4 steps,
its checkpoint at step 2; the RM after 4 of 6 steps) and resumed by a second launch: its whole trajectory
must still be the one-process one, which it is only if the partitioned optimizer state was checkpointed
(AdamW at lr 3e-3 with restarted moments takes other steps). Then ``selfrank run`` goes through every
stage under ``accelerate launch`` with 2 processes and W&B offline.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.launch.test_tracking import history, offline_runs, read_records
from tests.train.helpers import tiny_config, tiny_policy
from tests.train.test_distributed import ACCELERATE, DS_CONFIG, REPO, finish, free_port, start, worker_env
from tests.train.test_reward import write_preferences
from selfrank.train.config import TrackingConfig
from selfrank.train.models.causal_lm import load_model
from selfrank.train.pipeline import run_pipeline
from selfrank.train.models.reward_model import RewardModel

WORKER = Path(__file__).resolve().parent / "dist_scripts" / "stage_train.py"
COMMON = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
# Measured (4 SFT steps, 6 RM steps, AdamW), largest relative loss difference to one process:
# SFT DDP (2 accumulation steps) 8.9e-8, ZeRO-3 1.1e-7; RM 2.6e-6 for both (float summation order).
DDP_RTOL = 5e-5
ZERO3_RTOL = 5e-5
# Trained RM's raw reward on a probe text: measured 1.7e-3 relative (AdamW turns the tiny gradient
# differences of near-converged weights into full-size steps); SFT weights: 4.6e-7 absolute.
RM_OUTPUT_RTOL = 1e-2


def ddp_cmd(*args: str) -> tuple[list[str], dict]:
    # On CPU accelerate needs both ACCELERATE_USE_CPU (gloo) and --multi_gpu (a real process group).
    return ([ACCELERATE, "launch", "--multi_gpu", *COMMON, "--main_process_port", str(free_port()), *args],
            worker_env(ACCELERATE_USE_CPU="1"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stages")
    data = root / "data"
    tiny_policy(data, seed=1)
    write_preferences(data, n_prompts=10)
    ds_config = root / "ds.json"
    ds_config.write_text(json.dumps(DS_CONFIG))
    worker = [str(WORKER), "--data", str(data)]

    def zero3(*args: str) -> tuple[list[str], dict]:
        return ([ACCELERATE, "launch", "--use_deepspeed", "--deepspeed_config_file", str(ds_config), *COMMON,
                 "--main_process_port", str(free_port()), *worker, "--out", str(root / "zero3"), *args], worker_env())

    procs = {
        "single": start([sys.executable, *worker, "--out", str(root / "single")], worker_env(), root / "single.log"),
        "ddp": start(*ddp_cmd(*worker, "--out", str(root / "ddp"), "--grad-accum", "2"), root / "ddp.log"),
        "zero3": start(*zero3("--stop-sft", "3", "--stop-reward", "4"), root / "zero3_stopped.log"),
    }
    for name, (proc, _) in procs.items():
        finish(proc, root / ("zero3_stopped.log" if name == "zero3" else f"{name}.log"), 600)
    stopped = json.loads((root / "zero3" / "stopped.json").read_text())
    checkpoints = {stage: json.loads((root / "zero3" / stage / "checkpoint" / "state.json").read_text())["step"]
                   for stage in ("sft", "rm")}
    finish(start(*zero3("--resume"), root / "zero3.log")[0], root / "zero3.log", 600)
    runs = {name: (root / name, json.loads((root / name / "result.json").read_text())) for name in procs}
    return runs | {"zero3_stopped": (stopped, checkpoints)}


def losses(result: dict, stage: str) -> list[float]:
    steps = [step for step, _ in result[stage]]
    assert steps == list(range(1, len(steps) + 1)), steps  # one entry per optimizer step, in order
    return [m["loss"] for _, m in result[stage]]


def rel_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def state(folder: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(folder)
    return model.state_dict()


def joined(stopped: list, resumed: list, checkpoint_step: int) -> list:
    """The metrics of a cut run up to its checkpoint, then those of its resumption (which must start there)."""
    assert [step for step, _ in resumed][0] == checkpoint_step + 1, (checkpoint_step, resumed)
    return [entry for entry in stopped if entry[0] <= checkpoint_step] + resumed


@pytest.mark.slow
def test_zero3_killed_and_resumed_run_keeps_its_optimizer_state(runs):
    stopped, checkpoints = runs["zero3_stopped"]
    _, resumed = runs["zero3"]
    # The cut run stopped after SFT step 3 (checkpoint at 2) and RM step 4 (checkpoint at 4).
    assert [step for step, _ in stopped["sft"]] == [1, 2, 3] and checkpoints["sft"] == 2
    assert [step for step, _ in stopped["reward"]] == [1, 2, 3, 4] and checkpoints["rm"] == 4
    assert resumed["sft_summary"]["resumed_from"] == 2 and resumed["rm_summary"]["resumed_from_step"] == 4
    assert [step for step, _ in resumed["sft"]] == [3, 4] and [step for step, _ in resumed["reward"]] == [5, 6]
    # The repeated SFT step 3 equals the cut run's own step 3 (same weights, moments, data and RNG).
    assert resumed["sft"][0][1]["loss"] == pytest.approx(stopped["sft"][2][1]["loss"], rel=1e-6)


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory_and_save_loadable_models(runs):
    _, one = runs["single"]
    stopped, checkpoints = runs["zero3_stopped"]
    folder, resumed = runs["zero3"]
    # The ZeRO-3 run was cut and resumed: its trajectory is the cut run's up to each checkpoint, then the
    # resumed run's; it must be the one-process trajectory all the same.
    runs = {**runs, "zero3": (folder, {**resumed, "sft": joined(stopped["sft"], resumed["sft"], checkpoints["sft"]),
                                       "reward": joined(stopped["reward"], resumed["reward"], checkpoints["rm"])})}
    for kind, rtol in (("ddp", DDP_RTOL), ("zero3", ZERO3_RTOL)):
        folder, two = runs[kind]
        assert two["world_size"] == 2, kind
        assert two["zero_stage"] == (3 if kind == "zero3" else 0)
        assert len(losses(two, "sft")) == 4 and len(losses(two, "reward")) == 6
        assert rel_diff(losses(one, "sft"), losses(two, "sft")) < rtol, (kind, one["sft"], two["sft"])
        assert rel_diff(losses(one, "reward"), losses(two, "reward")) < rtol, (kind, one["reward"], two["reward"])
        # Learning-rate schedule stepped once per optimizer step, not once per process.
        assert [m["lr"] for _, m in two["sft"]] == [m["lr"] for _, m in one["sft"]]
        # The reported metrics are global: both ranks logged the same reduced numbers.
        first, second = two["sft_losses_per_rank"]
        assert first == second == [m["loss"] for _, m in (resumed if kind == "zero3" else two)["sft"]]
        assert [m["accuracy"] for _, m in two["reward"]] == pytest.approx([m["accuracy"] for _, m in one["reward"]])
        assert two["sft_summary"]["processes"] == 2 and two["rm_summary"]["processes"] == 2
        assert two["rm_summary"]["heldout_accuracy"] == pytest.approx(one["rm_summary"]["heldout_accuracy"])
        assert two["rm_summary"]["normalizer"]["reference_samples"] == one["rm_summary"]["normalizer"]["reference_samples"]
        assert two["rm_summary"]["normalizer"]["gain"] == pytest.approx(one["rm_summary"]["normalizer"]["gain"], rel=1e-3)

        # The saved folders load in this (one) process and hold the same weights as the one-process run's.
        a, b = state(runs["single"][0] / "sft" / "model"), state(folder / "sft" / "model")
        assert set(a) == set(b)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5, msg=f"{kind} {key}")
        rm_one = RewardModel.from_pretrained(runs["single"][0] / "rm" / "model")
        rm_two = RewardModel.from_pretrained(folder / "rm" / "model")
        ids = torch.tensor([rm_one.tokenizer("<q> what does anna have ? <a> a red ball")["input_ids"]])
        torch.testing.assert_close(rm_two(ids, torch.ones_like(ids)), rm_one(ids, torch.ones_like(ids)),
                                   rtol=RM_OUTPUT_RTOL, atol=1e-4)
        assert float(rm_two.gain) == pytest.approx(float(rm_one.gain), rel=1e-3)
        assert not (folder / "sft" / "checkpoint").exists()  # removed by the main process on success
    assert losses(one, "sft")[-1] < losses(one, "sft")[0]  # it trains
    assert losses(one, "reward")[-1] < losses(one, "reward")[0]


@pytest.mark.slow
def test_selfrank_run_under_accelerate_with_two_processes_and_wandb(tmp_path):
    config = tiny_config(tmp_path / "runs", name="dist-pipe",
                         tracking=TrackingConfig(wandb="offline", project="selfrank-test"))
    # Both processes rank through one pool on this node (served by local rank 0).
    config = dataclasses.replace(config, sample=dataclasses.replace(config.sample, async_ranking=True, workers=1))
    # The online-RM variant too: each process ranks its own rollout groups through that pool.
    config = dataclasses.replace(config, variants=[*config.variants, "str_online"], ppo=dataclasses.replace(
        config.ppo, steps=3, samples_per_prompt=2, online_rm_every=1))
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    # The shipped CPU launcher config (2 processes, gloo), as the docs tell users to run it.
    cmd = [ACCELERATE, "launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"),
           "--main_process_port", str(free_port()), "-m", "selfrank", "run", str(config_path)]
    env = worker_env(ACCELERATE_USE_CPU="1")
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb-dir"), WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
               WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    env.pop("RANK", None)
    proc, _ = start(cmd, env, tmp_path / "run.log")
    _, seconds, text = finish(proc, tmp_path / "run.log", 600)

    run_dir = tmp_path / "runs" / "dist-pipe"
    for stage in ("sft", "sample", "reward", "ppo", "eval"):
        summary = json.loads((run_dir / stage / "DONE.json").read_text())
        assert summary["processes"] == 2 and summary["gpu_hours"] == 0.0, (stage, summary)
        assert summary["working_processes"] == 2
    for variant in config.variants:
        assert json.loads((run_dir / "reward" / variant / "DONE.json").read_text())["processes"] == 2
    online_rows = [json.loads(line) for line in (run_dir / "ppo" / "str_online" / "log.jsonl").read_text().splitlines()]
    assert len(online_rows) == 3 and all("ranking/queue_depth" in r for r in online_rows)
    assert sum(r["online_rm/pairs"] for r in online_rows) > 0  # ranked groups came back and refreshed the RM
    assert any("online_rm/loss" in r for r in online_rows)
    ranking = json.loads((run_dir / "sample" / "DONE.json").read_text())["ranking"]
    # Batch 0 (4 prompts) went to the main process, batch 1 to the other; one shared pool of 1 worker.
    assert ranking["client_completed"] == 4 and ranking["workers"] == 1, ranking
    assert (run_dir / "sft" / "model" / "model.safetensors").is_file()
    load_model(run_dir / "sft" / "model")  # the saved folder loads in one process
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["name"] == "dist-pipe"
    assert (run_dir / "eval" / "report.md").is_file()
    assert text.count("report: ") == 1 and text.count("| STR + noise |") == 1  # printed once, by the main process

    # One W&B run (the main process's), with every stage's metrics and the sampled-answers table.
    (wandb_file,) = offline_runs(run_dir)
    records = list(read_records(wandb_file))
    rows = history(records)
    keys = set().union(*rows)
    expected = {"sft/loss", "sft/lr", "sft/step", "reward/str/loss", "reward/str/accuracy", "reward/str_noise/loss",
                "sample/pairs", "eval/sft/meteor", "eval/str/f1", "sample/answers/path"}
    assert expected <= keys, sorted(expected - keys)
    sft_steps = [r["sft/step"] for r in rows if "sft/loss" in r]
    assert sft_steps == list(range(1, config.sft.max_steps + 1))
    table_ref = next(r for r in rows if "sample/answers/path" in r)
    table = json.loads((wandb_file.parent / "files" / table_ref["sample/answers/path"]).read_text())
    assert "textrank_score" in table["columns"] and "role" in table["columns"]
    assert len(table["data"]) == config.sample.max_prompts * config.sample.samples_per_prompt
    assert {row[table["columns"].index("role")] for row in table["data"]} & {"winner", "loser", "both"}
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert any(a.name == "eval-report" and "report.md" in [c.path for c in a.manifest.contents] for a in artifacts)
    assert seconds < 150, seconds

    # Sample and eval were shared out batch by batch: one process gets the same outputs from the same SFT model.
    single = tmp_path / "single"
    shutil.copytree(run_dir / "sft", single / "dist-pipe" / "sft")
    run_pipeline(dataclasses.replace(config, output_dir=str(single), tracking=TrackingConfig()), ["sample", "eval"])
    for name in ("sample/ranked.jsonl", "sample/pairs.jsonl", "eval/generations_sft.jsonl",
                 "eval/generations_original.jsonl"):
        assert (single / "dist-pipe" / name).read_text() == (run_dir / name).read_text(), name

    def textrank_groups(path: Path) -> list[dict]:  # the one-process rerun has no reward models to score with
        groups = [json.loads(line) for line in path.read_text().splitlines()]
        return [{**g, "scores": {"textrank": g["scores"]["textrank"]}} for g in groups]

    assert textrank_groups(single / "dist-pipe" / "eval" / "agreement_groups.jsonl") == \
        textrank_groups(run_dir / "eval" / "agreement_groups.jsonl")
    assert not list((run_dir / "sample").glob("progress.*"))  # merged and removed
