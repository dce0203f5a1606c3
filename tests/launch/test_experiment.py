"""The experiment grid end to end on one real-data task, one seed, tiny sizes (the CI smoke variant)."""
from __future__ import annotations

import json

from selfrank.launch.experiment import AgreementSweepConfig, GridConfig, run_grid


def test_grid_smoke_on_real_squad(tmp_path, repo_root, shared_data, monkeypatch):
    monkeypatch.chdir(repo_root)  # the task configs name ../shared/data relative to the repository
    tiny = ["task.max_train=48", "task.max_validation=8", "task.max_test=12", "sft.max_steps=3",
            "sft.batch_size=8", "sft.baselines=[bitfit]", "sample.max_prompts=6", "sample.samples_per_prompt=4",
            "sample.async_ranking=false", "ranking.embedder.name=lexical", "reward.max_steps=3",
            "reward.batch_size=4", "ppo.steps=2", "ppo.batch_size=4", "ppo.max_new_tokens=6",
            "eval.max_examples=12", "eval.max_new_tokens=6", "eval.bootstrap=50", "eval.agreement_groups=4",
            "model.tiny.vocab_size=400", "variants=[str, str_noise]"]
    doc = tmp_path / "RESULTS.md"
    grid = GridConfig(name="smoke", tasks=["configs/tiny_squad_v2.yaml"], seeds=[3], overrides=tiny,
                      output_dir=str(tmp_path), results_doc=str(doc), command="selfrank experiment smoke.yaml",
                      bootstrap=50, notes="What held and what did not.", agreement_sweep=AgreementSweepConfig(tasks=["tiny_squad_v2"], sizes=[4, 2],
                                                                         embedders=["lexical"]))
    results = run_grid(grid)
    pooled = results["tasks"]["tiny_squad_v2"]
    assert list(pooled["rows"]) == ["original", "sft", "bitfit", "str", "str_noise", "sft_greedy", "sft_majority",
                                     "sft_rerank_str", "sft_rerank_str_noise", "str_greedy", "str_noise_greedy"]
    for row in pooled["rows"].values():
        for cell in row["metrics"].values():
            assert cell["low"] <= cell["mean"] <= cell["high"]
    ledger = results["ledgers"]["tiny_squad_v2"][0]
    sample = json.loads((tmp_path / "smoke" / "tiny_squad_v2-s3" / "sample" / "DONE.json").read_text())
    assert ledger["pairs"] == sample["pairs"] > 0
    assert ledger["crowd_cost"] == ledger["pairs"] * 3 * 0.10
    sweep = results["agreement_sweeps"]["tiny_squad_v2"]
    assert sweep["n_groups"] == 4 and [(c["embedder"], c["k"]) for c in sweep["cells"]] == [("lexical", 2), ("lexical", 4)]
    for cell in sweep["cells"]:
        assert cell["best_pick"]["mean"] >= cell["top_pick"]["mean"] - 1e-12
        assert cell["best_pick"]["mean"] >= cell["random_pick"]["mean"] - 1e-12
        assert 1 <= cell["mean_clusters"] <= cell["k"]
        assert cell["textrank"]["all"]["n_groups"] == 4
    text = doc.read_text()
    assert "Agreement sweep" in text and "| lexical | 4 |" in text
    assert "controls: SFT greedy" in text and "SFT majority" in text
    assert "decoding greedily, vs SFT greedy: str_greedy" in text
    assert "## Reading the results\n\nWhat held and what did not." in text
    summary = text.split("## Summary")[1].split("##")[0]
    assert "**tiny_squad_v2** (em x100 vs SFT): str " in summary and "TextRank's top answer vs a random one (lexical, K=4)" in summary
    assert "selfrank experiment smoke.yaml" in text and "| STR + noise |" in text and "Cost ledger" in text
    assert (tmp_path / "smoke" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Rerunning reuses every completed stage.
    kept = [*(tmp_path / "smoke").rglob("DONE.json"), tmp_path / "smoke" / "tiny_squad_v2-s3" / "agreement_sweep.json"]
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    run_grid(grid)
    assert {p: p.stat().st_mtime_ns for p in kept} == stamps
    # ... also after an upgrade that added a setting (here: one removed from the records, at its default)
    for done in [p for p in kept if p.name == "DONE.json"]:
        record = json.loads(done.read_text())
        if "settings" in record and "eval" in record["settings"]:
            del record["settings"]["eval"]["controls"]
            record["settings_digest"] = "before-the-upgrade"
            done.write_text(json.dumps(record))
    sweep_file = kept[-1]
    sweep_file.write_text(json.dumps({**json.loads(sweep_file.read_text()), "settings_digest": "before-the-upgrade"}))
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    run_grid(grid)
    assert {p: p.stat().st_mtime_ns for p in kept} == stamps
