"""W&B tracking, checked by reading the offline run files back.

wandb 0.31 ships no Python reader for its ``.wandb`` transaction log (the service that writes it is the
``wandb-core`` binary). The file is a LevelDB-style log (a 7-byte ``:W&B`` header, then 32 KiB blocks
of records each framed by a 7-byte checksum/length/type header) of ``wandb_internal_pb2.Record``
protobufs, so ``read_records`` below undoes that framing and decodes each record with wandb's own
protobuf classes.
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest

from selfrank.launch.tracking import (ID_FILE, SAMPLE_COLUMNS, TRL_NAMES, Tracker, has_credentials, pipeline_callbacks,
                                      resolve_mode, sample_rows, trl_metrics)
from selfrank.train.config import ExperimentConfig, TrackingConfig

SECRET = "fakeKey-0123456789abcdef0123456789abcdef"
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path}: not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (_FIRST, _MIDDLE):
            pending = (b"" if kind == _FIRST else pending) + payload
            continue
        record = pb.Record()
        record.ParseFromString(pending + payload if kind == _LAST else payload)
        pending = b""
        yield record


def history(records) -> list[dict]:
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.delenv("RANK", raising=False)
    return tmp_path


def _config(mode: str = "offline") -> ExperimentConfig:
    config = ExperimentConfig(name="track-test", tracking=TrackingConfig(wandb=mode, project="selfrank-test"))
    # A secret that reached the config by value (a credentialed URL) must be masked as well.
    config.task.train = f"https://user:{SECRET}@data.example/train.jsonl"
    return config


GROUP = {"id": "g1", "prompt": "<q> 2+2 <a>", "responses": ["4", "four", "5"], "scores": [0.4, 0.35, 0.25],
         "order": [0, 1, 2], "clusters": [0, 0, 1], "representatives": [0, 2], "pairs": [[0, 2]], "noise": [None]}


def test_sample_rows_roles_ranks_and_rewards():
    rows = sample_rows([GROUP], rewards={("g1", 0): 1.5, ("g1", 2): -0.5})
    assert [r[:3] for r in rows] == [["g1", "<q> 2+2 <a>", "4"], ["g1", "<q> 2+2 <a>", "four"],
                                     ["g1", "<q> 2+2 <a>", "5"]]
    by_answer = {r[2]: dict(zip(SAMPLE_COLUMNS, r)) for r in rows}
    assert by_answer["4"]["role"] == "winner" and by_answer["5"]["role"] == "loser"
    assert by_answer["four"]["role"] == "none" and by_answer["four"]["representative"] is False
    assert by_answer["5"]["rank"] == 2 and by_answer["5"]["cluster"] == 1
    assert by_answer["4"]["reward"] == 1.5 and by_answer["four"]["reward"] is None
    assert len(sample_rows([GROUP, GROUP], max_rows=4)) == 4


def test_mode_falls_back_to_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert resolve_mode("online", {}) == "offline"
    assert resolve_mode("online", {"WANDB_API_KEY": "x" * 40}) == "online"
    assert resolve_mode("disabled", {"WANDB_API_KEY": "x" * 40}) == "disabled"
    assert TrackingConfig().wandb == "disabled"  # the documented default


def test_a_wandb_login_counts_as_credentials(monkeypatch, tmp_path):
    """`wandb login` writes the key to netrc, not to the environment: online mode must see it."""
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert has_credentials({}) and resolve_mode("online", {}) == "online"
    # Another W&B host (a private server) needs its own entry.
    assert not has_credentials({"WANDB_BASE_URL": "https://wandb.example.org"})


def test_disabled_and_non_main_trackers_write_nothing(env):
    run_dir = env / "quiet"
    for tracker in (Tracker.open(_config("disabled"), run_dir, resume=False),
                    Tracker.open(_config("offline"), run_dir, resume=False, is_main=False)):
        assert not tracker.enabled and tracker.id is None
        tracker.log({"loss": 1.0}, step=0, stage="sft")
        tracker.log_table("samples", ["a"], [[1]])
        tracker.finish()
    assert not run_dir.exists()


def test_offline_run_reads_back_resumes_and_leaks_no_secret(env, caplog):
    caplog.set_level(logging.INFO)
    run_dir = env / "runs" / "track-test"
    config = _config()
    report = env / "report.md"
    report.write_text("# report\nBLEU 1.0\n")

    tracker = Tracker.open(config, run_dir, resume=False)
    assert tracker.enabled
    first_id = tracker.id
    assert (run_dir / ID_FILE).read_text().strip() == first_id
    tracker.log({"loss": 2.5, "lr": 1e-4}, step=0, stage="sft")
    tracker.log({"loss": 2.0}, step=1, stage="sft")
    tracker.log({"accuracy": 0.75}, step=0, stage="reward")  # a new stage starts again at step 0
    tracker.log_table("samples", SAMPLE_COLUMNS, sample_rows([GROUP]), stage="sample")
    tracker.log_artifact_files([report])
    logging.getLogger("selfrank.test").warning("using key %s", SECRET)
    with pytest.raises(ValueError):
        tracker.log({"x": 1}, step=0, stage="not-a-stage")
    tracker.finish()

    (wandb_file,) = offline_runs(run_dir)
    records = list(read_records(wandb_file))
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.run_id == first_id and run_record.project == "selfrank-test"
    logged_config = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    assert logged_config["sft"]["lr"] == config.sft.lr
    assert logged_config["task"]["train"] == "https://user:***@data.example/train.jsonl"

    rows = history(records)
    assert {"sft/loss": 2.5, "sft/lr": 1e-4, "sft/step": 0}.items() <= rows[0].items()
    assert {"sft/loss": 2.0, "sft/step": 1}.items() <= rows[1].items()
    assert {"reward/accuracy": 0.75, "reward/step": 0}.items() <= rows[2].items()
    table_ref = next(r for r in rows if "sample/samples/path" in r)
    assert table_ref["sample/samples/_type"] == "table-file"
    table = json.loads((wandb_file.parent / "files" / table_ref["sample/samples/path"]).read_text())
    assert table["columns"] == SAMPLE_COLUMNS
    assert [row[2] for row in table["data"]] == ["4", "four", "5"]
    assert table["data"][0][SAMPLE_COLUMNS.index("role")] == "winner"
    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert any(a.name == "eval-report" and [c.path for c in a.manifest.contents] == ["report.md"]
               for a in artifacts)

    # --resume continues the same W&B run; a fresh start draws a new one.
    resumed = Tracker.open(config, run_dir, resume=True)
    assert resumed.id == first_id
    resumed.log({"kl": 0.1}, step=3, stage="ppo")
    resumed.finish()
    files = offline_runs(run_dir)
    assert len(files) == 2
    second = next(f for f in files if f != wandb_file)
    second_records = list(read_records(second))
    assert [r.run.run_id for r in second_records if r.WhichOneof("record_type") == "run"] == [first_id]
    assert any(row.get("ppo/kl") == 0.1 for row in history(second_records))
    fresh = Tracker.open(config, run_dir, resume=False)
    assert fresh.id != first_id and (run_dir / ID_FILE).read_text().strip() == fresh.id
    fresh.finish()

    # The key is nowhere: not in any file (binary ones included), not in the captured logs.
    needle = SECRET.encode()
    leaked = [p for p in env.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert leaked == []
    assert caplog.records and all(SECRET not in r.getMessage() for r in caplog.records)
    assert "using key ***" in caplog.text


TRL_KEYS = ("objective/kl", "objective/entropy", "objective/rlhf_reward", "objective/scores", "policy/approxkl_avg",
            "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio", "lr",
            "episode", "eps")


def test_trl_names_cover_every_key_trl_logs():
    from selfrank.train.config import PPOConfig

    row = {f"str/{ours}": 1.0 for ours in TRL_NAMES} | {"str/time/step_s": 2.0, "str/reward/mean": 0.5}
    named = trl_metrics(row, PPOConfig(batch_size=4, samples_per_prompt=2, lr=1e-5), ["str"])
    assert {f"str/{key}" for key in TRL_KEYS} <= set(named)
    assert named["str/eps"] == 4.0 and named["str/lr"] == 1e-5 and named["str/reward/mean"] == 0.5


def test_a_tiny_offline_run_logs_ppo_under_trl_names_and_answers_with_rewards(env, tmp_path):
    """The whole pipeline up to PPO with W&B offline; the run's history, read back, holds every TRL key
    per PPO step, and the reward stage's sampled-answers table has its reward column filled."""
    from selfrank.train.pipeline import run_pipeline
    from tests.train.helpers import tiny_config

    config = tiny_config(tmp_path, name="trl")
    config.variants = ["str"]
    config.tracking = TrackingConfig(wandb="offline", project="selfrank-test")
    run_dir = tmp_path / "trl"
    with Tracker.open(config, run_dir, resume=False) as tracker:
        run_pipeline(config, ["sft", "sample", "reward", "ppo"], **pipeline_callbacks(tracker, config))
    (wandb_file,) = offline_runs(run_dir)
    rows = history(list(read_records(wandb_file)))
    ppo_rows = [row for row in rows if "ppo/step" in row]
    assert [row["ppo/step"] for row in ppo_rows] == list(range(1, config.ppo.steps + 1))
    for row in ppo_rows:
        missing = [key for key in TRL_KEYS if f"ppo/str/{key}" not in row]
        assert missing == [], missing
        assert row["ppo/str/lr"] == config.ppo.lr and row["ppo/str/episode"] % 4 == 0
        assert row["ppo/str/objective/kl_k3"] >= 0.0  # the k3 estimator is never negative
    files = wandb_file.parent / "files"
    sample_ref = next(r for r in rows if "sample/answers/path" in r)
    sample_table = json.loads((files / sample_ref["sample/answers/path"]).read_text())
    assert "reward" not in sample_table["columns"]  # no reward model yet: no empty column
    reward_ref = next(r for r in rows if "reward/str/answers/path" in r)
    table = json.loads((files / reward_ref["reward/str/answers/path"]).read_text())
    assert table["columns"] == SAMPLE_COLUMNS
    rewards = [row[SAMPLE_COLUMNS.index("reward")] for row in table["data"]]
    assert rewards and all(isinstance(r, float) for r in rewards) and len(set(rewards)) > 1
