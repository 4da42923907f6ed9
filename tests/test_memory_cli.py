"""`hiflow-fast plan` and `generate --memory-budget`: plans printed without weights, bad budgets
refused with one line and exit status 2."""

from __future__ import annotations

import json

import pytest

from hiflow_fast.cli import main


def test_plan_prints_every_stage(capsys):
    assert main(["plan", "--memory-budget", "12GiB", "--size", "4096x4096"]) == 0
    out = capsys.readouterr().out
    for text in ("base stage 1024x1024", "stage 1 2048x2048", "stage 2 4096x4096", "resident", "streamed",
                 "tiles 1024px", "MLP chunk: 8192", "CUDA graphs", "estimated peak", "overhead", "final decode"):
        assert text in out, text


def test_plan_json_and_model_dir(capsys, tiny_model_dir):
    assert main(["plan", "--memory-budget", "8GiB", "--json", "--model", tiny_model_dir, "--base-size", "256x256",
                 "--target-sizes", "512x512,1024x1024", "--highres-steps", "4,3", "--steps", "8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["exact"] and [s["height"] for s in plan["stages"]] == [256, 512, 1024]
    assert all(len(s["resident_blocks"]) == 3 for s in plan["stages"])  # tiny: 1 + 2 blocks, all fit


def test_plan_lossy_is_named(capsys):
    assert main(["plan", "--memory-budget", "8GiB", "--lossy", "fp8"]) == 0
    assert "LOSSY" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, flag, text",
    [
        (["plan", "--memory-budget", "lots"], "--memory-budget", "12GiB"),
        (["plan", "--memory-budget", "2GiB"], "--memory-budget", "at least"),
        (["plan", "--memory-budget", "8GiB", "--size", "4000x4001"], "--size", "multiples of 16"),
        (["plan", "--memory-budget", "8GiB", "--target-sizes", "2048x2048", "--highres-steps", "3,4"], "--highres-steps", "1 integers"),
        (["plan", "--memory-budget", "8GiB", "--model", "/nonexistent"], "--model", "config.json"),
        (["generate", "--memory-budget", "twelve", "--quiet", "--output", "never.png"], "--memory-budget", "12GiB"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, tmp_path, monkeypatch, argv, flag, text):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and flag in err and text in err
    assert not (tmp_path / "never.png").exists()
