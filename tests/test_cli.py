"""`hiflow-fast generate`: runs on the embedded model, writes a PNG with its parameters, and
turns every bad input into one clear line and exit status 2."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from hiflow_fast.cli import main

# A fast plan for the embedded tiny model.
FAST = ["--size", "128x128", "--steps", "3", "--target-sizes", "192x192", "--highres-steps", "2",
        "--highres-guidance", "4.5", "--filter-ratio", "0.2", "--alphas", "1.0", "--betas", "0.5", "--ntk", "10", "--quiet"]


def test_generate_writes_png_with_metadata(tmp_path):
    out = tmp_path / "img.png"
    assert main(["generate", *FAST, "--seed", "5", "--output", str(out), "--save-stages"]) == 0
    image = Image.open(out)
    assert image.size == (192, 192)
    meta = json.loads(image.text["parameters"])
    assert meta["seed"] == 5 and meta["target_heights"] == [192] and meta["num_inference_steps"] == 3
    assert sorted(os.listdir(tmp_path)) == ["img.png", "img_stage0.png", "img_stage1.png"]
    assert Image.open(tmp_path / "img_stage0.png").size == (128, 128)
    assert oct(os.stat(out).st_mode & 0o777) != "0o600"


def test_no_silent_overwrite(tmp_path, capsys):
    out = tmp_path / "img.png"
    out.write_bytes(b"precious")
    assert main(["generate", *FAST, "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(["generate", *FAST, "--output", str(out), "--overwrite", "--seed", "1"]) == 0
    assert Image.open(out).size == (192, 192)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--size", "120x128"], "multiple of 16"),
        (["--size", "big"], "--size"),
        (["--target-sizes", "192x100"], "multiple of 16"),
        (["--target-sizes", "96x96"], "grows"),
        (["--highres-steps", "4"], "at most --steps=3"),
        (["--highres-steps", "2,2"], "--highres-steps"),
        (["--alphas", "1,0.5"], "--alphas"),
        (["--ntk", "ten"], "--ntk"),
        (["--sharpening-sigma", "wide"], "--sharpening-sigma"),
        (["--output", "x.jpg"], "--output"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, words):
    code = main(["generate", *FAST, "--output", str(tmp_path / "img.png"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and words in err and "Traceback" not in err
    assert not os.listdir(tmp_path)


def test_missing_and_corrupt_model_files(tmp_path, capsys, tiny_model_dir):
    assert main(["generate", *FAST, "--model", str(tmp_path / "none"), "--output", str(tmp_path / "a.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    shutil.rmtree(broken / "vae")
    assert main(["generate", *FAST, "--model", str(broken), "--output", str(tmp_path / "b.png")]) == 2
    assert "vae/" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    assert main(["generate", *FAST, "--model", str(corrupt), "--output", str(tmp_path / "c.png")]) == 2
    assert "could not load" in capsys.readouterr().err


def test_bad_prompt_embeds_file(tmp_path, capsys):
    bad = tmp_path / "embeds.safetensors"
    bad.write_bytes(b"not safetensors")
    assert main(["generate", *FAST, "--prompt-embeds", str(bad), "--output", str(tmp_path / "a.png")]) == 2
    assert "--prompt-embeds" in capsys.readouterr().err


def test_nan_in_latents_is_a_clear_error(tmp_path, capsys, tiny_model_dir):
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["proj_out.bias"] = torch.full_like(tensors["proj_out.bias"], float("nan"))
    save_file(tensors, weights)
    assert main(["generate", *FAST, "--model", str(model), "--preset", "tiny", "--output", str(tmp_path / "a.png")]) == 2
    assert "non-finite" in capsys.readouterr().err


def test_console_script_default_run(tmp_path):
    # The console script of this interpreter's environment (not another one on PATH).
    exe = os.path.join(os.path.dirname(sys.executable), "hiflow-fast")
    cmd = [exe] if os.path.isfile(exe) else [sys.executable, "-m", "hiflow_fast.cli"]
    loud = [a for a in FAST if a != "--quiet"]
    result = subprocess.run([*cmd, "generate", *loud, "--seed", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hiflow.png").exists()
    assert "seed 2" in result.stdout


def test_bench_unknown_name(capsys):
    assert main(["bench", "no-such-bench"]) == 2
    assert "bench" in capsys.readouterr().err


def _batch_embeds(tmp_path, tiny_model_dir, batch):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(tiny_model_dir, "prompt_embeds.safetensors"))
    path = tmp_path / "batch.safetensors"
    save_file({k: torch.cat([v] * batch) for k, v in tensors.items()}, str(path))
    return path


def test_every_image_of_a_batch_is_saved(tmp_path, tiny_model_dir):
    embeds = _batch_embeds(tmp_path, tiny_model_dir, 2)
    out = tmp_path / "img.png"
    assert main(["generate", *FAST, "--seed", "3", "--prompt-embeds", str(embeds), "--output", str(out), "--save-stages"]) == 0
    assert sorted(os.listdir(tmp_path)) == [
        "batch.safetensors", "img_0.png", "img_0_stage0.png", "img_0_stage1.png", "img_1.png", "img_1_stage0.png", "img_1_stage1.png",
    ]
    meta = json.loads(Image.open(tmp_path / "img_1.png").text["parameters"])
    assert meta["batch_index"] == 1 and meta["batch_size"] == 2
    for key in ("hiflow_fast_version", "device", "dtype", "backend", "attention", "compile", "torch_version", "diffusers_version"):
        assert key in meta
    assert meta["backend"] == "ref" and meta["attention"] == "sdpa" and meta["device"] == "cpu"


@pytest.mark.parametrize("error, code", [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_a_failure_while_writing_leaves_nothing_and_the_rerun_works(tmp_path, capsys, monkeypatch, error, code):
    import hiflow_fast.cli as cli

    real = cli._png_writer
    calls = []

    def failing_writer(image, metadata):
        write = real(image, metadata)

        def maybe_fail(tmp):
            calls.append(tmp)
            if len(calls) == 2:  # the second file: stage 0 is already written
                raise error
            write(tmp)

        return maybe_fail

    monkeypatch.setattr(cli, "_png_writer", failing_writer)
    args = ["generate", *FAST, "--seed", "4", "--output", str(tmp_path / "img.png"), "--save-stages"]
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    assert code != 2 or (err[0].startswith("error: --output=") and "No space left" in err[0])
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(cli, "_png_writer", real)
    assert main(args) == 0
    assert sorted(os.listdir(tmp_path)) == ["img.png", "img_stage0.png", "img_stage1.png"]


def test_one_value_applies_to_every_stage_and_defaults_follow_the_stage_count(tmp_path):
    out = tmp_path / "img.png"
    args = ["generate", "--size", "64x64", "--steps", "2", "--target-sizes", "96x96,128x128,160x160", "--alphas", "0.5", "--quiet"]
    assert main([*args, "--output", str(out), "--seed", "1"]) == 0
    meta = json.loads(Image.open(out).text["parameters"])
    assert meta["alphas"] == [0.5, 0.5, 0.5]
    assert meta["betas"] == [0.5, 0.5, 0.5] and meta["ntk_factor"] == [10.0, 10.0, 10.0]
    assert meta["num_inference_steps_highres"] == [2, 2, 2]  # the preset's 4,3 capped at --steps
    assert meta["size"] == "64x64" and meta["target_sizes"] == ["96x96", "128x128", "160x160"]


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "{auto,triton,ref}" in text and "{fft,dwt}" in text and "(default: float32)" in text
    assert "(default: hiflow.png)" in text and "(default: off)" in text


def test_version(capsys):
    from hiflow_fast import __version__

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"hiflow-fast {__version__}"


def test_bench_options_without_a_name_run_the_suite(monkeypatch):
    import hiflow_fast.bench.bench_all as bench_all

    seen = []
    monkeypatch.setattr(bench_all, "main", lambda argv: seen.append(argv) or 0)
    assert main(["bench", "--device", "cpu"]) == 0
    assert seen == [["--device", "cpu"]]
