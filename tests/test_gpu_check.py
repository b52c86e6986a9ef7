"""bench/gpu_check.py, the first-run check for a CUDA machine, runs its CPU-runnable stages here so it cannot rot."""

from __future__ import annotations

import json

from bench import gpu_check


def test_cpu_mode_runs_env_micro_and_cli_stages(tmp_path) -> None:
    out = tmp_path / "check"
    rc = gpu_check.main(["--cpu", "--stages", "env,micro,cli,pytest,b14", "--out", str(out), "--limit-scale", "3"])
    summary = {r["name"]: r["status"] for r in json.loads((out / "summary.json").read_text())}
    assert summary == {"env": "PASS", "micro": "PASS", "cli": "PASS", "pytest": "SKIP", "b14": "SKIP"}, summary
    assert rc == 0
    cli = (out / "cli.log").read_text()
    assert "swap3                  relative difference to plain 0.00e+00 (equal) ok" in cli
    assert "fp8_scaled" in cli and "CLI FAILURES: none" in cli
    micro = (out / "micro.log").read_text()
    assert "MICRO FAILURES: none" in micro and "Fp32Linear" in micro


def test_stage_selection_is_validated(capsys) -> None:
    try:
        gpu_check.parse_args(["--stages", "env,nope"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("an unknown stage was accepted")
    assert "unknown nope" in capsys.readouterr().err
    assert gpu_check.parse_args(["--cpu"]).stages == gpu_check.CPU_STAGES
    assert gpu_check.parse_args([]).stages == gpu_check.STAGES
