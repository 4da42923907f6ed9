"""Bad input on the command line: every case answers before any weights are loaded with exactly
one `error:` line naming the flag as typed, exit status 2, no traceback and no file written.

Most cases run `hiflow_fast.cli.main` in this process with the model loader replaced by one that
fails the test if called; a few run the console script to check the whole path end to end."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from hiflow_fast.cli import main

# A fast plan for the embedded tiny model (as in test_cli.py).
FAST = ["--size", "128x128", "--steps", "3", "--target-sizes", "192x192", "--highres-steps", "2", "--quiet"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading weights."""
    from hiflow_fast.pipeline import HiFlowPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded: the bad input was not caught up front")

    monkeypatch.setattr(HiFlowPipeline, "from_pretrained", classmethod(refuse))


def _files(folder):
    return sorted(os.listdir(folder))


def run_bad(tmp_path, capsys, args, flag, *, output=True):
    """Run `generate` with `args`; check exit 2, one error line naming `flag`, nothing written."""
    before = _files(tmp_path)
    argv = ["generate", *FAST, *args]
    if output and "--output" not in args:
        argv += ["--output", str(tmp_path / "out.png")]
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert flag in lines[0], lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert _files(tmp_path) == before
    return lines[0]


# ---- every numeric option at NaN, inf, negative, zero (where refused) and absurdly large --------
NUMERIC = {
    "--steps": ["nan", "inf", "-1", "0", "1e12", "100000", "2.5"],
    "--guidance": ["nan", "inf", "-1", "1e12"],
    "--highres-guidance": ["nan", "inf", "-1", "1e12"],
    "--highres-steps": ["nan", "inf", "-1", "0", "1e12"],
    "--filter-ratio": ["nan", "inf", "-1", "1e12", "5"],
    "--alphas": ["nan", "inf", "-3", "1e12", "5"],
    "--betas": ["nan", "inf", "-1", "1e12", "100"],
    "--ntk": ["nan", "inf", "-1", "0", "1e12"],
    "--sharpening-sigma": ["nan", "inf", "-1", "0", "1e12"],
    "--seed": ["nan", "inf", "-1", "1e12", str(2**63)],
    "--size": ["nanxnan", "0x0", "-16x16", "100000x100000", "16000x16000", "120x128", "big"],
    "--target-sizes": ["nanxnan", "0x0", "30000x30000", "96x96", "192x100"],
    "--memory-budget": ["nan", "inf", "-1", "0", "12XB", "0.001GiB"],
}
NUMERIC_CASES = [(flag, value) for flag, values in NUMERIC.items() for value in values]


@pytest.mark.parametrize("flag, value", NUMERIC_CASES, ids=[f"{f}={v}" for f, v in NUMERIC_CASES])
def test_numeric_option_out_of_range(tmp_path, capsys, no_model_load, flag, value):
    line = run_bad(tmp_path, capsys, [flag, value], flag)
    assert "is not allowed:" in line


@pytest.mark.parametrize(
    "flag, value",
    [("--structure-guidance", "wavelet"), ("--upsampling", "nearest"), ("--dtype", "float64"),
     ("--backend", "foo"), ("--attention", "foo"), ("--preset", "huge"), ("--lossy", "int4")],
)
def test_unknown_choice(tmp_path, capsys, no_model_load, flag, value):
    line = run_bad(tmp_path, capsys, [flag, value], flag)
    assert value in line and "choose from" in line


DEVICES = ["gpu", "foo", "cuda:99", "", "cpu:x"] + ([] if torch.cuda.is_available() else ["cuda"])


# (ids prefixed: a bare "gpu" id would read as the gpu marker)
@pytest.mark.parametrize("device", DEVICES, ids=[f"device={d!r}" for d in DEVICES])
def test_device_that_does_not_exist(tmp_path, capsys, no_model_load, device):
    line = run_bad(tmp_path, capsys, ["--device", device], "--device")
    assert "cpu" in line  # says what is allowed


def test_negative_list_values_parse_then_are_refused_by_range(tmp_path, capsys, no_model_load):
    line = run_bad(tmp_path, capsys, ["--target-sizes", "192x192,256x256", "--filter-ratio", "-0.1,0.2"], "--filter-ratio")
    assert "-0.1" in line and "high-res stage 1 of 2" in line


def test_memory_budget_below_every_plan_states_the_minimum(tmp_path, capsys, no_model_load):
    line = run_bad(tmp_path, capsys, ["--memory-budget", "1MiB"], "--memory-budget")
    assert "'1MiB'" in line and "at least" in line and "GiB" in line


def test_memory_budget_auto_without_a_gpu(tmp_path, capsys, no_model_load):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert "CUDA" in run_bad(tmp_path, capsys, ["--memory-budget", "auto"], "--memory-budget")


def test_lossy_without_a_memory_budget(tmp_path, capsys, no_model_load):
    line = run_bad(tmp_path, capsys, ["--lossy", "fp8"], "--lossy")
    assert "--memory-budget" in line


def test_lossy_with_compile(tmp_path, capsys, no_model_load):
    line = run_bad(tmp_path, capsys, ["--lossy", "fp8", "--memory-budget", "64GiB", "--compile"], "--compile")
    assert "--lossy" in line


def test_stage_list_length_names_the_flag_typed(tmp_path, capsys, no_model_load):
    line = run_bad(tmp_path, capsys, ["--alphas", "1,0.5,0.25"], "--alphas")
    assert "1 value" in line and "192x192" in line


def test_unavailable_attention_backend(tmp_path, capsys, no_model_load):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    run_bad(tmp_path, capsys, ["--attention", "sdpa-cudnn"], "--attention")


def test_prompt_and_prompt_embeds_together(tmp_path, capsys, no_model_load, tiny_model_dir):
    embeds = os.path.join(tiny_model_dir, "prompt_embeds.safetensors")
    run_bad(tmp_path, capsys, ["--prompt", "a cat", "--prompt-embeds", embeds], "--prompt")


def test_prompt_without_text_encoders(tmp_path, capsys, no_model_load):
    run_bad(tmp_path, capsys, ["--prompt", "a cat"], "--prompt")


def test_unknown_option_is_one_line(tmp_path, capsys, no_model_load):
    run_bad(tmp_path, capsys, ["--no-such-option", "1"], "--no-such-option")


def test_option_missing_its_value(tmp_path, capsys, no_model_load):
    run_bad(tmp_path, capsys, ["--output"], "--output", output=False)


# ---- output locations ------------------------------------------------------------------------


def test_output_in_proc_is_refused_even_as_root(tmp_path, capsys, no_model_load):
    run_bad(tmp_path, capsys, ["--output", "/proc/hiflow-test.png"], "--output")


def test_output_in_missing_folder(tmp_path, capsys, no_model_load):
    run_bad(tmp_path, capsys, ["--output", str(tmp_path / "missing" / "x.png")], "--output")


@pytest.mark.parametrize("overwrite", [False, True])
def test_directory_as_output(tmp_path, capsys, no_model_load, overwrite):
    (tmp_path / "dir.png").mkdir()
    line = run_bad(tmp_path, capsys, ["--output", str(tmp_path / "dir.png"), *(["--overwrite"] if overwrite else [])], "--output")
    assert "directory" in line


def test_output_folder_without_room(tmp_path, capsys, no_model_load, monkeypatch):
    real = os.statvfs

    class Full:
        def __init__(self, stats):
            self.f_frsize, self.f_bavail = stats.f_frsize, 1

    monkeypatch.setattr(os, "statvfs", lambda path: Full(real(path)))
    line = run_bad(tmp_path, capsys, [], "--output")
    assert "room" in line


def test_output_not_png(tmp_path, capsys, no_model_load):
    run_bad(tmp_path, capsys, ["--output", str(tmp_path / "x.jpg")], "--output")


def test_existing_output_without_overwrite(tmp_path, capsys, no_model_load):
    (tmp_path / "out.png").write_bytes(b"precious")
    run_bad(tmp_path, capsys, [], "--output")
    assert (tmp_path / "out.png").read_bytes() == b"precious"


def test_existing_stage_image_without_overwrite(tmp_path, capsys, no_model_load):
    (tmp_path / "out_stage1.png").write_bytes(b"precious")
    line = run_bad(tmp_path, capsys, ["--save-stages"], "--output")
    assert "out_stage1.png" in line


def test_batch_image_path_checked_up_front(tmp_path, capsys, no_model_load, tiny_model_dir):
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(tiny_model_dir, "prompt_embeds.safetensors"))
    batch = {k: torch.cat([v, v]) for k, v in tensors.items()}
    save_file(batch, str(tmp_path / "two.safetensors"))
    (tmp_path / "out_1.png").write_bytes(b"precious")
    line = run_bad(tmp_path, capsys, ["--prompt-embeds", str(tmp_path / "two.safetensors")], "--output")
    assert "out_1.png" in line


# ---- model folders ---------------------------------------------------------------------------


@pytest.fixture
def model_copy(tmp_path, tiny_model_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def test_missing_model_folder(tmp_path, capsys, no_model_load):
    run_bad(tmp_path, capsys, ["--model", str(tmp_path / "none")], "does not exist")


def test_model_without_vae(tmp_path, capsys, no_model_load, model_copy):
    shutil.rmtree(model_copy / "vae")
    run_bad(tmp_path, capsys, ["--model", str(model_copy), "--preset", "tiny"], "vae/")


def test_truncated_model_weights(tmp_path, capsys, no_model_load, model_copy):
    weights = model_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    line = run_bad(tmp_path, capsys, ["--model", str(model_copy), "--preset", "tiny"], "truncated")
    assert "diffusion_pytorch_model.safetensors" in line


def test_pickle_carrying_model_weights(tmp_path, capsys, no_model_load, model_copy):
    weights = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    torch.save({"weight": torch.zeros(2)}, model_copy / "vae" / "diffusion_pytorch_model.bin")
    run_bad(tmp_path, capsys, ["--model", str(model_copy), "--preset", "tiny"], "pickled")


def test_unreadable_model_weights(tmp_path, capsys, no_model_load, model_copy):
    # Unreadable even as root: the weights "file" is a directory.
    weights = model_copy / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.mkdir()
    run_bad(tmp_path, capsys, ["--model", str(model_copy), "--preset", "tiny"], "diffusion_pytorch_model.safetensors")


def test_corrupt_model_config(tmp_path, capsys, no_model_load, model_copy):
    (model_copy / "transformer" / "config.json").write_text("{not json")
    run_bad(tmp_path, capsys, ["--model", str(model_copy), "--preset", "tiny"], "config")


# ---- prompt embedding files ------------------------------------------------------------------


def _embeds_file(tmp_path, tiny_model_dir, change):
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(tiny_model_dir, "prompt_embeds.safetensors"))
    change(tensors)
    path = tmp_path / "embeds.safetensors"
    save_file(tensors, str(path))
    return path


def _set(name, value):
    def change(tensors):
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value(tensors[name])

    return change


@pytest.mark.parametrize(
    "change, words",
    [
        (_set("pooled_prompt_embeds", None), "pooled_prompt_embeds"),
        (_set("prompt_embeds", None), "prompt_embeds"),
        (_set("prompt_embeds", lambda t: t.to(torch.int32)), "floating-point"),
        (_set("prompt_embeds", lambda t: t.index_fill(1, torch.tensor([3]), math.nan)), "finite"),
        (_set("pooled_prompt_embeds", lambda t: t * math.inf), "finite"),
        (_set("prompt_embeds", lambda t: t.repeat(1, 20, 1)), "max_sequence_length"),
        (_set("prompt_embeds", lambda t: t[..., :8].contiguous()), "shape"),
        (_set("pooled_prompt_embeds", lambda t: t[:, :8].contiguous()), "pooled_prompt_embeds"),
        (_set("pooled_prompt_embeds", lambda t: torch.cat([t, t])), "pooled_prompt_embeds"),
    ],
    ids=["no-pooled", "no-embeds", "int-dtype", "nan", "inf-pooled", "too-long", "wrong-dim", "pooled-dim", "pooled-batch"],
)
def test_bad_prompt_embeds_content(tmp_path, capsys, no_model_load, tiny_model_dir, change, words):
    path = _embeds_file(tmp_path, tiny_model_dir, change)
    line = run_bad(tmp_path, capsys, ["--prompt-embeds", str(path)], "--prompt-embeds")
    assert words in line


def test_truncated_prompt_embeds_file(tmp_path, capsys, no_model_load, tiny_model_dir):
    path = tmp_path / "embeds.safetensors"
    data = open(os.path.join(tiny_model_dir, "prompt_embeds.safetensors"), "rb").read()
    path.write_bytes(data[: len(data) // 2])
    line = run_bad(tmp_path, capsys, ["--prompt-embeds", str(path)], "--prompt-embeds")
    assert "truncated" in line


def test_pickle_carrying_prompt_embeds_file(tmp_path, capsys, no_model_load):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    path = tmp_path / "embeds.safetensors"
    import pickle

    path.write_bytes(pickle.dumps({"prompt_embeds": Boom()}))
    run_bad(tmp_path, capsys, ["--prompt-embeds", str(path)], "--prompt-embeds")
    assert not os.path.exists("pwned") and not (tmp_path / "pwned").exists()


def test_torch_save_prompt_embeds_file(tmp_path, capsys, no_model_load):
    path = tmp_path / "embeds.pt"
    torch.save({"prompt_embeds": torch.zeros(1, 4, 32), "pooled_prompt_embeds": torch.zeros(1, 32)}, path)
    run_bad(tmp_path, capsys, ["--prompt-embeds", str(path)], "--prompt-embeds")


@pytest.mark.parametrize("kind", ["missing", "directory", "empty"])
def test_unreadable_prompt_embeds_file(tmp_path, capsys, no_model_load, kind):
    path = tmp_path / "embeds.safetensors"
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    run_bad(tmp_path, capsys, ["--prompt-embeds", str(path)], "--prompt-embeds")


# ---- end to end: the console script, one line, no traceback --------------------------------


def _console(args, cwd):
    # The console script of this interpreter's environment (not another one on PATH).
    exe = os.path.join(os.path.dirname(sys.executable), "hiflow-fast")
    cmd = [exe] if os.path.isfile(exe) else [sys.executable, "-m", "hiflow_fast.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--device", "cuda:99"], "--device"),
        (["--filter-ratio", "-0.1,0.2", "--target-sizes", "512x512,1024x1024"], "--filter-ratio"),
    ],
)
def test_console_script_one_line_no_traceback(tmp_path, args, flag):
    result = _console(["generate", *args], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}"), result.stderr
    assert os.listdir(tmp_path) == []


def test_debug_raises_the_error_for_its_traceback(tmp_path, no_model_load):
    from hiflow_fast import HiFlowInputError

    with pytest.raises(HiFlowInputError) as info:
        main(["generate", "--steps", "0", "--debug", "--output", str(tmp_path / "x.png")])
    assert info.value.field == "--steps"
    assert os.listdir(tmp_path) == []


# ---- --parallel (context parallelism under torchrun) ----------------------------------------
TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
PARALLEL_CASES = [
    (["--parallel", "ulysses=0"], "--parallel"),
    (["--parallel", "fsdp=2"], "--parallel"),
    (["--parallel", "ring=2.5"], "--parallel"),
    (["--parallel", "ulysses=1,ring=1"], "--parallel"),
    (["--parallel", "ring=2,ring=2"], "--parallel"),
    (["--parallel", "ulysses=2"], "--parallel"),  # not under torchrun
    (["--parallel", "ulysses=2", "--compile"], "--compile"),
    (["--parallel", "ulysses=2", "--memory-budget", "8GiB"], "--memory-budget"),
    (["--parallel", "ulysses=2", "--parallel-timeout", "nan"], "--parallel-timeout"),
    (["--parallel", "ulysses=2", "--parallel-timeout", "-5"], "--parallel-timeout"),
    (["--parallel", "ulysses=2", "--parallel-timeout", "soon"], "--parallel-timeout"),
]


@pytest.mark.parametrize("args, flag", PARALLEL_CASES, ids=[" ".join(a) for a, _ in PARALLEL_CASES])
def test_parallel_flags(tmp_path, capsys, no_model_load, args, flag):
    run_bad(tmp_path, capsys, args, flag)


@pytest.mark.parametrize("spec, why", [("ring=2", "product"), ("ulysses=4", "heads")])
def test_parallel_checked_against_launch_and_model(tmp_path, capsys, no_model_load, monkeypatch, spec, why):
    """Under a (pretend) torchrun of 4 processes: a spec for another world size, and a Ulysses
    degree the embedded model's 2 heads cannot split over, are refused before any weight."""
    for name, value in TORCHRUN_ENV.items():
        monkeypatch.setenv(name, value)
    assert why in run_bad(tmp_path, capsys, ["--parallel", spec], "--parallel")
