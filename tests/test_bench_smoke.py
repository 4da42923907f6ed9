"""Smoke tests of the benchmarks: every benchmark at its smallest CPU size (seconds each), the
records it writes, and the pieces the benchmarks' numbers rest on (FLOP counts, the official
baseline doing the same work as the pipeline, the stage extrapolation). No timing assertions:
speed is measured in bench/, never asserted here."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch

from hiflow_fast.bench import bench_all
from hiflow_fast.bench import flux_shapes as fs

# Keys every record of every benchmark carries (bench/common.py's make_record).
COMMON_KEYS = {"name", "device", "path", "median_s", "min_s", "max_s", "peak_bytes", "versions", "commit", "device_name"}
# Floor-ratio names of the past: every benchmark now writes `fraction_of_floor` itself.
OLD_FLOOR_NAMES = {"floor_fraction", "fraction_of_matmul", "of_floor", "matmul_flops_per_s", "cpu_threads"}
# Keys of the records of the benchmarks of this suite (e2e, vae) and of merged `bench all` output.
FLOOR_KEYS = {"floor_s", "fraction_of_floor", "flops", "matmul_rate_flops", "copy_bandwidth_bytes_per_s"}
E2E_KEYS = COMMON_KEYS | FLOOR_KEYS | {"plan", "plan_spec", "stage", "model", "dtype", "estimated", "text_encoding_timed"}
VAE_KEYS = COMMON_KEYS | FLOOR_KEYS | {"op", "size", "is_baseline", "tile_pixels"}


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """One torch thread: on a 2-core machine shared with other jobs, a 2-thread pool stalls at
    every OpenMP barrier while the other core is busy (tiny convolutions then take 100x longer),
    which made these seconds-long smoke runs take minutes. Nothing here asserts a timing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(name: str, tmp_path, *extra: str) -> list[dict]:
    module = importlib.import_module(f"hiflow_fast.bench.bench_{name}")
    out = tmp_path / f"{name}.json"
    status = module.main(["--device", "cpu", "--cpu-allocator", "system", *bench_all.suite_args(name, "cpu", smoke=True),
                          *extra, "--json", str(out)])
    assert status == 0
    records = json.loads(out.read_text())
    assert records, f"bench {name} wrote no records"
    assert_each_case_once(records)
    return records


def assert_each_case_once(records: list[dict]) -> None:
    """No case written twice (the benchmarks write each case as soon as it is measured)."""
    keys = [json.dumps([r.get(k) for k in ("name", "path", "label", "latent_hw", "op", "stage", "plan")]) for r in records]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)


# ---- each benchmark at its smallest size ---------------------------------------------------


@pytest.mark.parametrize("name", [n for n in bench_all.available_benchmarks() if n != "e2e"])
def test_benchmark_runs_at_smoke_size(name, tmp_path):
    if not bench_all.SUITE.get(name, bench_all.SuiteEntry(name)).smoke:
        pytest.skip(f"bench {name} has no smoke arguments in bench_all.SUITE yet")
    records = _run(name, tmp_path)
    for record in records:
        missing = COMMON_KEYS - set(record)
        assert not missing, f"{name} record lacks {sorted(missing)}"
        assert not OLD_FLOOR_NAMES & set(record), f"{name} record uses {sorted(OLD_FLOOR_NAMES & set(record))}"
        assert record["device"] == "cpu"
        assert record["versions"]["torch"] == torch.__version__
        if "floor_s" in record:  # the one floor vocabulary: fraction_of_floor = floor_s / median_s
            assert record["fraction_of_floor"] == pytest.approx(record["floor_s"] / record["median_s"])
    if name in ("guidance", "transformer"):
        assert all("latent_hw" in r and r.get("fraction_of_floor") for r in records)
    if name == "vae":
        for record in records:
            assert not VAE_KEYS - set(record)
            assert record["floor_s"] > 0 and record["fraction_of_floor"] > 0
        assert {r["path"] for r in records} == {"tiled", "untiled"}
        assert {r["op"] for r in records} == {"decode", "encode"}


def test_bench_all_runs_e2e_and_merges(tmp_path):
    """`bench all --smoke --only e2e`: the cascade benchmark through the suite runner, merged
    JSON and markdown, both paths, every stage, CPU labelled as CPU."""
    json_path, md_path = tmp_path / "all.json", tmp_path / "all.md"
    status = bench_all.main(["--device", "cpu", "--cpu-allocator", "system", "--smoke", "--only", "e2e", "--json",
                             str(json_path), "--markdown", str(md_path)])
    assert status == 0
    records = json.loads(json_path.read_text())
    assert len(records) == 2 * 4  # two paths x (base, stage1, decode, total)
    assert_each_case_once(records)
    for record in records:
        assert not E2E_KEYS - set(record), sorted(E2E_KEYS - set(record))
        assert record["text_encoding_timed"] is False
        assert record["median_s"] > 0 and record["floor_s"] > 0
        assert record["primed"] is False  # a CPU compiles nothing on a first call
    assert {r["path"] for r in records} == {"ours", "official"}
    assert {r["stage"] for r in records} == {"base", "stage1", "decode", "total"}
    ours_total = next(r for r in records if r["path"] == "ours" and r["stage"] == "total")
    assert ours_total["official_over_ours"] > 0
    markdown = md_path.read_text()
    assert "CPU" in markdown and "not GPU results" in markdown
    assert "text encoding is not timed" in markdown
    assert "official / ours" in markdown


def test_e2e_primes_each_path_untimed_before_timing(tmp_path, capsys):
    """--prime (the default on a GPU): each path runs once on one step of the first plan's base
    and first high-res stage before anything is timed, and the records say so."""
    from hiflow_fast.bench import bench_e2e

    # Up to 3 steps of the first high-res stage (every guided-velocity variant and both swin
    # grids) and of the base (whose schedule they end); no later stage.
    (plan,) = bench_e2e.parse_plans("64x6>128x5>256x2")
    assert plan.primer().base == (64, 64, 3) and plan.primer().stages == ((128, 128, 3),)
    (plan,) = bench_e2e.parse_plans("64x3>128x2>256x2")
    assert plan.primer().base == (64, 64, 3) and plan.primer().stages == ((128, 128, 2),)
    plan.primer().config()  # a valid HiFlowConfig
    out = tmp_path / "e2e.json"
    status = bench_e2e.main(["--device", "cpu", "--cpu-allocator", "system", *bench_all.suite_args("e2e", "cpu", smoke=True),
                             "--prime", "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    primed = printed.index("primed ours"), printed.index("primed official")
    assert max(primed) < printed.index("plan tiny")  # before the first timed plan
    records = json.loads(out.read_text())
    assert records and all(r["primed"] is True for r in records)


@pytest.mark.parametrize("name", ["all", "guidance", "transformer", "vae", "e2e", "compile", "attention_tuning"])
def test_existing_output_is_refused_without_overwrite(name, tmp_path, capsys, monkeypatch):
    """Every bench CLI refuses an existing output (status 2, one `error:` line naming
    --overwrite) before it measures anything, and leaves the file as it was."""
    from hiflow_fast.bench import common

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured before refusing the existing output")

    monkeypatch.setattr(common, "run_environment", no_measuring)  # start() measures nothing before it
    module = importlib.import_module(f"hiflow_fast.bench.bench_{name}")
    for option in ("--json", "--markdown"):
        existing = tmp_path / f"out{option[2:]}"
        existing.write_text("keep")
        status = module.main(["--device", "cpu", option, str(existing)])
        assert status == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "--overwrite" in err and str(existing) in err
        assert existing.read_text() == "keep"


def test_overwrite_replaces_atomically_and_partial_json_grows(tmp_path):
    """Outputs: refused without overwrite; `add` rewrites the JSON case by case (what a stopped
    run leaves); with overwrite an existing file is replaced."""
    from hiflow_fast.bench.common import Outputs
    from hiflow_fast.errors import HiFlowInputError

    path = tmp_path / "r.json"
    outputs = Outputs(path)
    outputs.add([{"name": "a"}])
    assert json.loads(path.read_text()) == [{"name": "a"}]
    outputs.add([{"name": "b"}])  # its own file: replaced without --overwrite
    outputs.finish("", title="t")
    assert [r["name"] for r in json.loads(path.read_text())] == ["a", "b"]
    with pytest.raises(HiFlowInputError, match="--overwrite"):
        Outputs(path)
    again = Outputs(path, overwrite=True)
    again.finish("", title="t")
    assert json.loads(path.read_text()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary files left


def test_bench_all_keep_parts_refuses_existing_parts(tmp_path, capsys):
    (tmp_path / "vae.json").write_text("[]")
    status = bench_all.main(["--device", "cpu", "--cpu-allocator", "system", "--smoke", "--only", "vae", "--keep-parts",
                             str(tmp_path)])
    assert status == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--plans", "nonsense"],
        ["--plans", "64x2>100x1"],  # 100 px is not a multiple of 16
        ["--paths", "ours,fast"],
        ["--repeats", "0"],
        ["--model", "huge"],
    ],
)
def test_e2e_rejects_bad_arguments(argv, capsys):
    from hiflow_fast.bench import bench_e2e

    try:
        status = bench_e2e.main(["--device", "cpu", *argv])
    except SystemExit as exc:  # argparse's own choices
        status = exc.code
    assert status == 2
    assert capsys.readouterr().err


def test_vae_rejects_bad_sizes(capsys):
    from hiflow_fast.bench import bench_vae

    assert bench_vae.main(["--device", "cpu", "--cpu-allocator", "system", "--sizes", "100"]) == 2
    assert "--sizes" in capsys.readouterr().err


# ---- what the numbers rest on --------------------------------------------------------------


@pytest.mark.parametrize("size, tokens", [("full", (4096, 512)), ("reduced", (1089, 64))])
def test_transformer_flops_match_torch_flop_counter(size, tokens):
    """The analytic count (57 (24 d^2 L + 4 d L^2) + embedders for FLUX.1-dev) equals what
    torch.utils.flop_counter counts on the meta device."""
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    config = fs.MODEL_SIZES[size].transformer
    image, text = tokens
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
        inputs = dict(
            hidden_states=torch.empty(1, image, config["in_channels"]),
            encoder_hidden_states=torch.empty(1, text, config["joint_attention_dim"]),
            pooled_projections=torch.empty(1, config["pooled_projection_dim"]),
            timestep=torch.ones(1), guidance=torch.ones(1),
            img_ids=torch.zeros(image, 3), txt_ids=torch.zeros(text, 3),
        )
    with FlopCounterMode(display=False) as counter:
        model(**inputs, return_dict=False)
    assert fs.transformer_step_flops(config, image, text) == counter.get_total_flops()


def test_flux_dev_flops_are_the_design_numbers():
    """DESIGN.md: ~74 TFLOP per step at 1024^2, ~3.9 PFLOP at 4096^2, ~49 PFLOP for the official
    cascade; the 2K cascade ~8.9 PFLOP (issue 5)."""
    from hiflow_fast.bench.bench_e2e import PLANS, plan_phases

    cfg = fs.FLUX_DEV_TRANSFORMER
    assert fs.transformer_step_flops(cfg, 4096, 512) == pytest.approx(74.4e12, rel=0.01)
    assert fs.transformer_step_flops(cfg, 65536, 512) == pytest.approx(3.9e15, rel=0.02)
    size = fs.MODEL_SIZES["full"]
    for plan, expected in (("official", 49e15), ("2k", 8.9e15)):
        phases = plan_phases(PLANS[plan], size, weight_bytes=0)
        total = sum(p.flops for stage in phases.values() for p in stage)
        assert total == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("tiled", [False, True])
def test_vae_flops_match_torch_flop_counter(tiled):
    """Tiled counts (summed over diffusers' tiles) equal a FlopCounterMode run of the tiled VAE."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    config = fs.MODEL_SIZES["tiny"].vae
    height, width = 160, 96  # tiles of 64 px: uneven edge tiles in both directions
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    vae.use_tiling = tiled
    with torch.no_grad():
        with FlopCounterMode(display=False) as decode:
            vae.decode(torch.empty(1, 16, height // 8, width // 8, device="meta"))
        with FlopCounterMode(display=False) as encode:
            vae.encode(torch.empty(1, 3, height, width, device="meta")).latent_dist.mode()
    assert fs.vae_flops(config, "decode", height, width, tiled=tiled) == decode.get_total_flops()
    assert fs.vae_flops(config, "encode", height, width, tiled=tiled) == encode.get_total_flops()


def test_random_models_have_flux_shapes_and_stay_finite():
    full = fs.parameter_count(fs.FLUX_DEV_TRANSFORMER)
    assert full == pytest.approx(11.9e9, rel=0.01)  # FLUX.1-dev's transformer
    size = fs.model_size("tiny")
    transformer = fs.build_transformer(size, dtype=torch.bfloat16)
    vae = fs.build_vae(size, dtype=torch.bfloat16)
    assert transformer.dtype == torch.bfloat16 and not any(p.is_meta for p in transformer.parameters())
    assert vae.config.scaling_factor == 0.3611 and vae.config.shift_factor == 0.1159
    embeds, pooled = fs.random_prompt(size, dtype=torch.bfloat16)
    with torch.no_grad():
        out = transformer(
            hidden_states=torch.randn(1, 64, 64, dtype=torch.bfloat16), encoder_hidden_states=embeds,
            pooled_projections=pooled, timestep=torch.ones(1), guidance=torch.full([1], 3.5),
            img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(embeds.shape[1], 3), return_dict=False,
        )[0]
        image = vae.decode(torch.randn(1, 16, 16, 16, dtype=torch.bfloat16), return_dict=False)[0]
    assert torch.isfinite(out).all() and torch.isfinite(image).all()


def test_random_models_keep_fp32_modules_and_cast_without_warning(caplog):
    """The bf16 cast keeps the modules a model names in `_keep_in_fp32_modules` in fp32 (as
    from_pretrained does), casts the rest, and logs nothing (diffusers' own `.to(dtype)` warns
    about fp32 modules even when a model has none)."""
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config

    class TwoLayers(ModelMixin, ConfigMixin):
        _keep_in_fp32_modules = ["norm", "scale_shift_table"]  # a module and a bare parameter

        @register_to_config
        def __init__(self, width: int = 8):
            super().__init__()
            self.proj = torch.nn.Linear(width, width)
            self.norm = torch.nn.LayerNorm(width)
            self.block = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(width), "proj": torch.nn.Linear(width, width)})
            self.block.scale_shift_table = torch.nn.Parameter(torch.zeros(2, width))
            self.register_buffer("norm_steps", torch.zeros(3))  # a buffer, not kept

    # diffusers' loggers do not propagate to the root logger (pytest's caplog): listen on its own.
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(caplog.handler)
    try:
        model = fs._materialise(TwoLayers, {"width": 8}, "cpu", torch.bfloat16, seed=0)
        fs.build_vae(fs.model_size("tiny"), dtype=torch.bfloat16)
    finally:
        diffusers_logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    dtypes = {name: p.dtype for name, p in [*model.named_parameters(), *model.named_buffers()]}
    assert dtypes == {
        "proj.weight": torch.bfloat16, "proj.bias": torch.bfloat16,
        "norm.weight": torch.float32, "norm.bias": torch.float32,
        "block.norm.weight": torch.float32, "block.norm.bias": torch.float32,
        "block.proj.weight": torch.bfloat16, "block.proj.bias": torch.bfloat16,
        "block.scale_shift_table": torch.float32, "norm_steps": torch.bfloat16,
    }
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())


def test_official_baseline_does_the_same_work_as_the_pipeline():
    """Same model, plan, prompt and noises: the official-way baseline and HiFlowPipeline give the
    same final latents (fp32), so the e2e benchmark compares equal work."""
    from hiflow_fast import HiFlowConfig, HiFlowPipeline, HiResStage
    from hiflow_fast.bench.bench_e2e import make_noises
    from hiflow_fast.bench.official_baseline import OfficialWayPipeline

    size = fs.model_size("tiny")
    transformer, vae, scheduler = fs.build_transformer(size), fs.build_vae(size), fs.flux_scheduler()
    embeds, pooled = fs.random_prompt(size)
    # Odd step count: the second stage ends on the swin-padded grid.
    config = HiFlowConfig(height=64, width=64, num_inference_steps=3, sharpening_sigma=1.0,
                          stages=(HiResStage(96, 96, 2), HiResStage(128, 128, 3, alpha=0.25)))
    base, stages = make_noises(config, 16, 0, "cpu", torch.float32)
    kwargs = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, config=config, latents=base, stage_noises=stages)
    ours = HiFlowPipeline(transformer, vae, scheduler)(**kwargs, seed=0, output_type="latent", progress=False)
    official = OfficialWayPipeline(transformer, vae, scheduler)(**kwargs, output_type="latent")
    assert ours.latent_hw == official.latent_hw == (18, 18)
    rel = (ours.latents - official.latents).norm() / ours.latents.norm()
    assert rel < 1e-5
    # The baseline leaves the shared model as it found it.
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    assert all(type(p) is FluxAttnProcessor for p in transformer.attn_processors.values())
    assert vae.use_tiling is False


def test_official_mask_loop_matches_the_reference_mask():
    from hiflow_fast.bench.official_baseline import official_butterworth_mask
    from hiflow_fast.ref.butterworth import butterworth_lowpass_mask

    mask = official_butterworth_mask((1, 2, 10, 12), 0.2, 4, "cpu")
    assert torch.equal(mask[0, 1], butterworth_lowpass_mask(10, 12, 0.2, 4))


def test_stage_extrapolation():
    from hiflow_fast.bench.bench_e2e import StageTimes, stage_seconds

    # All steps ran: the measured sum.
    assert stage_seconds(StageTimes(1.0, [2.0, 3.0], None), 2, alternating=True) == 6.0
    # Two of ten swin steps: five padded (even) at 2 s and five plain (odd) at 3 s.
    assert stage_seconds(StageTimes(1.0, [2.0, 3.0], None), 10, alternating=True) == 1.0 + 5 * 2.0 + 5 * 3.0
    # Odd count: one more even step.
    assert stage_seconds(StageTimes(0.0, [2.0, 3.0], None), 3, alternating=True) == 2 * 2.0 + 3.0
    assert stage_seconds(StageTimes(0.0, [2.0, 4.0], None), 30, alternating=False) == 30 * 3.0


def test_sampled_plan_and_custom_plans():
    from hiflow_fast.bench.bench_e2e import PLANS, parse_plans

    sampled = PLANS["official"].sampled(2)
    assert sampled.base == (1024, 1024, 2) and sampled.stages == ((2048, 2048, 2), (4096, 4096, 2))
    sampled.config()  # a valid HiFlowConfig
    (plan,) = parse_plans("1024x30>2048x1536x16")
    assert plan.base == (1024, 1024, 30) and plan.stages == ((2048, 1536, 16),)


def test_make_record_vocabulary():
    from hiflow_fast.bench.common import Timing, make_record

    env = {"versions": {}, "commit": None, "device_name": "cpu"}
    record = make_record("x", "cpu", "ref", Timing(2.0, 1.0, 3.0, 3), 5, env, latent_hw=(4, 6), floor_s=0.5)
    assert record["fraction_of_floor"] == 0.25 and record["label"] == "4x6" and record["latent_hw"] == [4, 6]
    skipped = make_record("x", "cpu", "ref", None, None, env, floor_s=0.5, skipped="out of memory")
    assert skipped["median_s"] is None and skipped["fraction_of_floor"] is None and skipped["repeats"] == 0
    assert "latent_hw" not in skipped


def test_measure_time_on_a_gpu_times_slow_ops_call_by_call(monkeypatch):
    """On a GPU: one untimed call, then a timed probe; an op of SLOW_CALL_S or more keeps the
    probe and gets repeats - 1 more event timings (no do_bench, whose estimation alone would run
    a 100 ms op 5 times); a faster op goes through do_bench. Events are faked: no GPU here."""
    import sys
    import types

    from hiflow_fast.bench import common

    def run(op_s: float, repeats: int):
        calls, timed, benched = [0], [], []
        monkeypatch.setattr(common, "_timed_calls", lambda fn, device, count: timed.append(count) or [op_s] * count)
        fake_testing = types.SimpleNamespace(do_bench=lambda fn, **kw: benched.append(kw) or [op_s * 1e3] * 2)
        monkeypatch.setitem(sys.modules, "triton.testing", fake_testing)
        timing = common.measure_time(lambda: calls.__setitem__(0, calls[0] + 1), "cuda", repeats=repeats)
        return timing, calls[0], timed, benched

    timing, untimed, timed, benched = run(common.SLOW_CALL_S * 5, repeats=3)
    assert (timing.repeats, untimed, timed, benched) == (3, 1, [1, 2], [])
    assert timing.median_s == pytest.approx(common.SLOW_CALL_S * 5)
    timing, untimed, timed, benched = run(common.SLOW_CALL_S / 10, repeats=5)
    assert len(benched) == 1 and benched[0]["return_mode"] == "all"
    assert timed == [1, 3] and timing.repeats == 5  # probe, then do_bench's 2 samples topped up to 5
    timing, _, timed, _ = run(common.SLOW_CALL_S * 5, repeats=1)
    assert timed == [1, 0] and timing.repeats == 1


def test_case_skip_reason_records_failures_and_lets_bad_input_through(capsys):
    from hiflow_fast.bench.common import FAILED_PREFIX, Outputs, case_skip_reason
    from hiflow_fast.errors import HiFlowInputError

    oom = case_skip_reason(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore"))
    assert oom == "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
    cpu_oom = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes.")
    assert case_skip_reason(cpu_oom).startswith("out of memory: DefaultCPUAllocator")
    assert case_skip_reason(MemoryError()) == "out of memory"
    assert capsys.readouterr().err == ""  # a size that does not fit is a result, not a failure
    try:
        raise RuntimeError("No available kernel. Aborting execution.")
    except RuntimeError as exc:
        failed = case_skip_reason(exc)
    assert failed == f"{FAILED_PREFIX}RuntimeError: No available kernel. Aborting execution."
    assert "Traceback" in capsys.readouterr().err  # the log keeps where it failed
    with pytest.raises(HiFlowInputError):
        case_skip_reason(HiFlowInputError("--sizes", "3k", "1k, 2k or 4k"))
    with pytest.raises(KeyboardInterrupt):
        case_skip_reason(KeyboardInterrupt())
    outputs = Outputs()
    outputs.add([{"skipped": oom}])
    assert outputs.exit_status == 0
    outputs.add([{"skipped": failed}])
    assert outputs.exit_status == 1


def test_a_failing_case_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    """bench vae with untiled encode raising: that case is a `failed: ...` record, the three
    others are measured, every record is in the JSON, and the exit status is 1."""
    from hiflow_fast.bench import bench_vae, common

    op_fn = bench_vae.op_fn

    def failing_op_fn(op, vae, x, tiled):
        if op == "encode" and not tiled:
            def fail():
                raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")
            return fail
        return op_fn(op, vae, x, tiled)

    monkeypatch.setattr(bench_vae, "op_fn", failing_op_fn)
    # No final rewrite: the JSON holds exactly what was written case by case.
    monkeypatch.setattr(common.Outputs, "finish", lambda self, markdown, title: None)
    out = tmp_path / "vae.json"
    status = bench_vae.main(["--device", "cpu", "--cpu-allocator", "system", *bench_all.suite_args("vae", "cpu", smoke=True),
                             "--json", str(out)])
    assert status == 1
    written = json.loads(out.read_text())
    assert len(written) == 4
    assert_each_case_once(written)
    records = {(r["op"], r["path"]): r for r in written}
    failed = records["encode", "untiled"]
    assert failed["median_s"] is None and failed["skipped"] == "failed: RuntimeError: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"
    assert all(r["median_s"] > 0 for key, r in records.items() if key != ("encode", "untiled"))
    # The tiled / untiled ratio, set after both modes ran, reached the JSON; none where one failed.
    assert records["decode", "untiled"]["baseline_over_this"] > 0
    assert "baseline_over_this" not in failed
    assert "CUDNN_STATUS_NOT_SUPPORTED" in capsys.readouterr().err


def test_attention_backend_that_raises_is_skipped(monkeypatch):
    from hiflow_fast import attention_backends
    from hiflow_fast.bench import bench_transformer as bt

    real = attention_backends.get_attention_backend

    def refusing(name=None):
        chosen, fn = real(name)
        if chosen != "sdpa-math":
            return chosen, fn
        def refuse(*args):
            raise RuntimeError("No available kernel.")
        return chosen, refuse

    monkeypatch.setattr(attention_backends, "get_attention_backend", refusing)
    skipped: dict[str, str] = {}
    timings = bt.time_attention(["sdpa", "sdpa-math"], 96, bt.QUICK, torch.device("cpu"), torch.float32, 1, 0,
                                skipped=skipped)
    assert set(timings) == {"sdpa"} and timings["sdpa"].median_s > 0
    assert skipped == {"sdpa-math": "failed: RuntimeError: No available kernel."}


def test_nvml_degrades_without_gpu(monkeypatch):
    """No GPU: None for a CPU device, and None (not an exception) when NVML cannot start."""
    import sys
    import types

    from hiflow_fast.bench.common import nvml_snapshot

    assert nvml_snapshot("cpu") is None

    class NVMLError(Exception):
        pass

    def init():
        raise NVMLError("LibraryNotFound")

    fake = types.SimpleNamespace(NVMLError=NVMLError, nvmlInit=init, nvmlShutdown=lambda: None)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert nvml_snapshot("cuda:0") is None


def test_nvml_field_the_driver_lacks_is_none(monkeypatch):
    import sys
    import types

    from hiflow_fast.bench.common import nvml_snapshot

    class NVMLError(Exception):
        pass

    def unsupported(*args):
        raise NVMLError("NotSupported")

    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: "h", nvmlDeviceGetHandleByPciBusId=unsupported,
        nvmlSystemGetDriverVersion=lambda: b"580.1", nvmlDeviceGetName=lambda h: b"H100",
        nvmlDeviceGetClockInfo=lambda h, k: 1980, nvmlDeviceGetMaxClockInfo=unsupported,
        nvmlDeviceGetPowerUsage=lambda h: 350000, nvmlDeviceGetEnforcedPowerLimit=unsupported,
        nvmlDeviceGetTemperature=lambda h, k: 40, nvmlDeviceGetMemoryInfo=unsupported,
        NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, NVML_TEMPERATURE_GPU=0,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    snap = nvml_snapshot("cuda:0")
    assert snap["name"] == "H100" and snap["driver"] == "580.1" and snap["power_w"] == pytest.approx(350.0)
    assert snap["max_sm_clock_mhz"] is None and snap["memory_total_bytes"] is None


def test_guidance_uses_the_one_official_baseline(monkeypatch):
    """bench_guidance's official path is official_baseline's step plus the swin moves, and it
    gives the reference path's outputs."""
    from hiflow_fast.bench import bench_guidance, official_baseline

    assert not hasattr(bench_guidance, "official_butterworth_mask")
    calls = []
    step = official_baseline.official_guidance_step
    monkeypatch.setattr(official_baseline, "official_guidance_step", lambda *a, **k: calls.append(1) or step(*a, **k))
    bench_guidance.path_fn("official", bench_guidance.make_inputs(8, torch.device("cpu")))()
    assert calls == [1]
    monkeypatch.undo()
    inputs = bench_guidance.make_inputs(16, torch.device("cpu"))
    official = bench_guidance.path_fn("official", inputs)()
    vectorised = bench_guidance.path_fn("official", inputs, for_memory=True)()
    # The ref path starts from the state already on this step's grid: give it the official one.
    inputs["state_cur"] = tuple(
        official_baseline.swin_move_packed(s, inputs["next_hw"], inputs["hw"]) for s in inputs["state_prev"]
    )
    ref = bench_guidance.path_fn("ref", inputs)()
    # The official step leaves the states on this step's grid; ref moves them onto the next one.
    x_next, pred_x0, v, v_ref = official
    hw, next_hw = inputs["hw"], inputs["next_hw"]
    moved = (x_next, pred_x0, *(official_baseline.swin_move_packed(s, hw, next_hw) for s in (v, v_ref)))
    for got, want in zip(moved, (ref.prev_sample, ref.pred_x0, ref.state.v, ref.state.v_ref)):
        assert got.shape == want.shape
        assert ((got - want).norm() / want.norm()) < 1e-5
    for got, vec in zip(official, vectorised):
        assert torch.equal(got, vec)


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    import sys

    from hiflow_fast.bench.plot import plot_records
    from hiflow_fast.errors import HiFlowInputError

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(HiFlowInputError, match="matplotlib"):
        plot_records([{"name": "x", "path": "p", "median_s": 1.0}], tmp_path / "p.png")


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from hiflow_fast.bench.plot import plot_records

    records = [
        {"name": "e2e", "path": "ours", "label": "tiny:total", "median_s": 1.0, "min_s": 0.9, "max_s": 1.1, "device": "cpu"},
        {"name": "e2e", "path": "official", "label": "tiny:total", "median_s": 2.0, "device": "cpu"},
        {"name": "vae", "path": "tiled", "label": "decode 64x64", "median_s": 0.5, "device": "cpu", "skipped": None},
    ]
    out = tmp_path / "p.png"
    plot_records(records, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- bench/gpu_check ----------------------------------------------------------------------


def _gpu_check_text() -> str:
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "gpu_check"
    if not path.exists():
        pytest.skip("bench/gpu_check is not in this tree")
    return path.read_text()


def test_gpu_check_budgets_fit_and_match_its_table():
    """The steps' timeouts sum to <= 450 s (the whole check within 8 minutes on an H100, so one
    rerun fits 15 minutes of device time) and equal the table atop the script."""
    import re

    text = _gpu_check_text()
    steps = {m.group(1): int(m.group(2)) for m in re.finditer(r"^step (\w+) (\d+) ", text, re.M)}
    table = {m.group(1): int(m.group(2)) for m in re.finditer(r"^#   \| (\w+) +\| +(\d+) s \|", text, re.M)}
    total = table.pop("total")
    assert steps and steps == table
    assert sum(steps.values()) == total <= 450
    assert "TOTAL_BUDGET_S=450" in text


def test_gpu_check_is_valid_bash():
    import shutil
    import subprocess

    text = _gpu_check_text()
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_cpu_allocator_choice_is_applied_once_and_recorded_truthfully():
    """--cpu-allocator: "system" changes nothing, "retain" sets glibc's thresholds (for the whole
    process, so a later "system" says so). In a subprocess: the test process keeps its allocator."""
    import subprocess
    import sys

    code = (
        "from hiflow_fast.bench.common import apply_cpu_allocator as a; "
        "print(a('system')); print(a('retain')); print(a('system'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    first, second, third = out.stdout.strip().splitlines()
    assert first == "system"
    assert second == "retain" or second.startswith("system (")  # no glibc mallopt: said, not faked
    assert third == ("retain (set earlier in this process)" if second == "retain" else "system")


def test_bench_all_runs_opt_in_benchmarks_only_when_named():
    """`bench all` leaves out the offline compile matrix and the GPU tuning measurement unless
    --only names them."""
    installed, names = bench_all._select(bench_all._parse(["--device", "cpu"]))
    assert {"compile", "attention_tuning"} <= set(installed)
    assert not set(names) & bench_all.OPT_IN
    assert bench_all._select(bench_all._parse(["--device", "cpu", "--only", "compile"]))[1] == ["compile"]


# ---- micro-benchmarks (bench/micro, pytest-benchmark) ----------------------------------------

MICRO_OPS = {"reference_flow", "spectral_lowpass_blend", "haar_lowpass_blend", "guided_velocity", "qk_norm_rope", "flash_attention"}


def test_micro_benchmarks_run_at_tiny_size(tmp_path):
    """bench/micro is not collected by `pytest` (testpaths), so it is run here, in a subprocess at
    its tiny shapes: every op and its reference measured once, one record each with a floor."""
    import os
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("pytest_benchmark")
    micro = pathlib.Path(__file__).resolve().parent.parent / "bench" / "micro"
    if not micro.is_dir():
        pytest.skip("bench/micro is not in this tree")
    out = tmp_path / "micro.json"
    # cwd outside the repository: `python -m pytest` puts the cwd first on sys.path, and the source
    # folder hiflow_fast/ there lacks the installed hiflow_fast.kernels / hiflow_fast.bench.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(micro), "--benchmark-only", "--micro-size", "tiny",
         "--micro-records", str(out), "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{2 * len(MICRO_OPS)} passed" in proc.stdout
    records = json.loads(out.read_text())
    assert {(r["name"], r["path"]) for r in records} == {(f"micro_{op}", p) for op in MICRO_OPS for p in ("triton", "ref")}
    assert_each_case_once(records)
    for record in records:
        assert COMMON_KEYS <= record.keys()
        assert record["median_s"] > 0 and record["floor_s"] > 0 and record["fraction_of_floor"] > 0
