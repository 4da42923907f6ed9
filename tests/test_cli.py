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
        (["--highres-steps", "4"], "at most num_inference_steps"),
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
    exe = shutil.which("hiflow-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "hiflow_fast.cli"]
    loud = [a for a in FAST if a != "--quiet"]
    result = subprocess.run([*cmd, "generate", *loud, "--seed", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hiflow.png").exists()
    assert "seed 2" in result.stdout


def test_bench_unknown_name(capsys):
    assert main(["bench", "no-such-bench"]) == 2
    assert "bench" in capsys.readouterr().err
