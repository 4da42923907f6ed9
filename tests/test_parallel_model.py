"""The multi-GPU scaling model (bench/parallel_model.py) and its command: communication bytes per
step worked out here by hand from the shapes, the stage-time arithmetic, the inputs taken from a
GPU run's records, and every output labelled a model. No process group, no timing."""

from __future__ import annotations

import json

import pytest

from hiflow_fast.bench import parallel_model as pm
from hiflow_fast.errors import HiFlowInputError


def config(heads=8, head_dim=16, double=2, single=3, channels=64):
    return dict(num_attention_heads=heads, attention_head_dim=head_dim, num_layers=double, num_single_layers=single,
                patch_size=1, in_channels=channels, out_channels=None)


# ---- communication bytes per step -----------------------------------------------------------
# Even splits: closed forms. S joint tokens, P = U x R ranks, E = H x D, b bytes, L attention layers.
#   Ulysses: 4 all-to-alls (q, k, v, out) per layer; each rank keeps 1/U of its S/P tokens x E and
#            sends the rest: 4 (S/P) E b (U-1)/U.
#   Ring:    k and v of the ring group's S/R... tokens (S/R per rank group after Ulysses), E/U wide,
#            all-gathered over R ranks: each sends its chunk R-1 times: 2 (S/R) (E/U) b.
#   proj_out: each rank's N/P image tokens x 64 features, all-gathered: (P-1) (N/P) 64 b.


@pytest.mark.parametrize("ulysses, ring", [(4, 1), (1, 4), (2, 2), (2, 1), (8, 1)])
def test_even_split_bytes_match_the_closed_forms(ulysses, ring):
    image, text, heads, head_dim, layers, b = 96, 32, 8, 16, 5, 2
    world = ulysses * ring
    seq, width = image + text, heads * head_dim
    per_rank = 0.0
    if ulysses > 1:
        per_rank += layers * 4 * (seq / world) * width * b * (ulysses - 1) / ulysses
    if ring > 1:
        per_rank += layers * 2 * (seq / ring) * (width / ulysses) * b * (ring - 1)
    per_rank += (world - 1) * (image / world) * 64 * b
    volume = pm.comm_per_step(ulysses, ring, image, text, config(heads, head_dim), b)
    assert volume.sent == [per_rank] * world and volume.received == [per_rank] * world
    assert volume.total == world * per_rank and volume.critical == per_rank
    assert sum(volume.by_kind.values()) == volume.total
    assert volume.collectives == layers * (4 * (ulysses > 1) + (ring > 1)) + 1


def test_uneven_ulysses_by_hand():
    """5 image + 3 text tokens over 2 ranks: tensor_split gives image [3, 2], text [2, 1], so
    joint [5, 3]; 2 heads of width 1 -> 1 head per rank; one layer; 1 byte; 4 output features.
    rank 0: q,k,v sends 3 x 5 = 15, out sends (8 - 5) = 3; receives 3 x 3 = 9 and 5.
    rank 1: sends 3 x 3 = 9 and 5; receives 15 and 3. proj_out: max(3, 2) x 4 = 12 each way."""
    volume = pm.comm_per_step(2, 1, 5, 3, config(heads=2, head_dim=1, double=1, single=0, channels=4), 1)
    assert volume.sent == [15 + 3 + 12, 9 + 5 + 12]
    assert volume.received == [9 + 5 + 12, 15 + 3 + 12]
    assert volume.critical == 30 and volume.total == 56
    assert volume.by_kind == {"ulysses_all_to_all": 18 + 14, "ring_all_gather": 0, "proj_out_all_gather": 24}


def test_padded_heads_in_both_by_hand():
    """3 heads over Ulysses 2 are padded to 4 (2 per rank; the group's last rank holds 1 real
    one after the all-to-all). 8 image tokens, no text, 4 ranks: 2 each; Ulysses groups {0, 1},
    {2, 3} hold 4 tokens. Width 1, one layer, 1 byte, 4 output features.
    Ulysses, every rank: q,k,v 3 x 2 tokens x 2 heads = 12 sent, out (4 - 2) x 2 = 4 -> 16.
    Ring groups {0, 2} (2 heads) and {1, 3} (1 head): k,v chunk 2 x 4 tokens x heads, sent once.
    proj_out: 2 tokens x 4 features x 3 peers = 24."""
    volume = pm.comm_per_step(2, 2, 8, 0, config(heads=3, head_dim=1, double=1, single=0, channels=4), 1)
    assert volume.sent == [16 + 16 + 24, 16 + 8 + 24, 16 + 16 + 24, 16 + 8 + 24]
    assert volume.received == volume.sent


def test_ring_pads_kv_to_the_longest_rank():
    """7 image tokens over ring 2: [4, 3]; each rank's k and v padded to 4 tokens before the
    all-gather. 1 head of width 1, one layer, 1 byte; proj_out 4 x 4 features."""
    volume = pm.comm_per_step(1, 2, 7, 0, config(heads=1, head_dim=1, double=0, single=1, channels=4), 1)
    assert volume.sent == [2 * 4 + 16, 2 * 4 + 16]


def test_flux_4k_step_volume():
    """FLUX.1-dev at 4K (256 x 256 image + 512 text tokens, 57 layers, 24 x 128, bf16) on
    Ulysses 8: 4 x 8256 tokens x 3072 x 2 bytes x 7/8 x 57 per rank = 10.1 GB."""
    from hiflow_fast.bench.flux_shapes import FLUX_DEV_TRANSFORMER

    volume = pm.comm_per_step(8, 1, 65536, 512, FLUX_DEV_TRANSFORMER, 2)
    attention = 57 * 4 * (66048 / 8) * 3072 * 2 * 7 / 8
    assert volume.by_kind["ulysses_all_to_all"] / 8 == pytest.approx(attention)
    assert volume.critical == pytest.approx(attention + 7 * 8192 * 64 * 2)


def test_bad_degrees_are_refused():
    with pytest.raises(ValueError):
        pm.comm_per_step(1, 1, 8, 0, config(), 2)
    assert pm.degrees("both", 8) == (4, 2) and pm.degrees("ulysses", 4) == (4, 1) and pm.degrees("ring", 2) == (1, 2)
    with pytest.raises(HiFlowInputError, match="--gpus"):
        pm.degrees("both", 7)


# ---- stage time ------------------------------------------------------------------------------


def test_prediction_arithmetic():
    stage = pm.StageSpec("t", 64, 64, 3, (32, 32))  # latent 8x8: grids 10x10, 8x8, 10x10
    inputs = pm.StageInputs(stage, entry_s=2.0, transformer_step_s=8.0, guidance_step_s=0.5)
    transformer = config()
    link = pm.Link("test", 1e6, "a test")
    p = pm.predict(inputs, 2, 2, link, transformer, 4, 2, latency_s=1e-3)
    tokens = [25, 16, 25]
    volumes = [pm.comm_per_step(2, 2, n, 4, transformer, 2) for n in tokens]
    comm_s = sum(v.critical for v in volumes) / 3 / 1e6 + volumes[0].collectives * 1e-3
    assert p.single_s == pytest.approx(2.0 + 3 * 8.5)
    assert p.parallel_s == pytest.approx(2.0 + 3 * 0.5 + 3 * (8.0 / 4 + comm_s))
    assert p.overlapped_s == pytest.approx(2.0 + 3 * 0.5 + 3 * max(2.0, comm_s))
    assert p.speedup == pytest.approx(p.single_s / p.parallel_s) and p.efficiency == pytest.approx(p.speedup / 4)
    # No communication cost: only the replicated part keeps the speedup below N.
    free = pm.predict(inputs, 4, 1, pm.Link("inf", float("inf"), ""), transformer, 4, 2, latency_s=0.0)
    assert free.parallel_s == pytest.approx(2.0 + 3 * (0.5 + 2.0)) == free.overlapped_s


# ---- inputs from a GPU run -------------------------------------------------------------------


def e2e_record(size, entry_s, step_s, **extra):
    record = dict(name="e2e", path="ours", device="cuda", model="full", stage="stage2", size=size, plan="official",
                  entry_s=entry_s, step_median_s=step_s, copy_bandwidth_bytes_per_s=3.0e12, estimated=True,
                  device_name="NVIDIA H100 80GB HBM3", median_s=entry_s + 10 * step_s)
    record.update(extra)
    return record


def test_measured_inputs_from_gpu_check_json(tmp_path):
    from hiflow_fast.bench.flux_shapes import FLUX_DEV_TRANSFORMER

    records = [
        e2e_record("4096x4096", 0.9, 6.0),
        e2e_record("4096x4096", 5.0, 60.0, device="cpu"),  # a CPU run: never a measured input
        dict(name="guidance", path="fused", device="cuda", latent_hw=[512, 512], median_s=0.004),
    ]
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps({"device": {}, "records": records}))
    inputs = pm.measured_inputs(pm.load_records(path), pm.STAGES["4k"], FLUX_DEV_TRANSFORMER, 512, str(path))
    assert (inputs.entry_s, inputs.guidance_step_s) == (0.9, 0.004)
    assert inputs.transformer_step_s == pytest.approx(6.0 - 0.004)
    assert inputs.measured and inputs.single_s == pytest.approx(0.9 + 10 * 6.0)
    # Without a guidance record: its bytes (8.25 fp32 latents of 16 x 512 x 512) over the copy bandwidth.
    inputs = pm.measured_inputs(records[:1], pm.STAGES["4k"], FLUX_DEV_TRANSFORMER, 512, "x")
    assert inputs.guidance_step_s == pytest.approx(8.25 * 16 * 512 * 512 * 4 / 3.0e12)
    assert pm.measured_inputs(records[1:2], pm.STAGES["4k"], FLUX_DEV_TRANSFORMER, 512, "x") is None


def test_a_stage_not_measured_is_scaled_from_one_that_was():
    """Only the 2K stage measured: the 4K transformer step at the 2K step's TFLOP/s (FLOPs
    ratio, each stage's swin grids), the entry by the pixel ratio."""
    from hiflow_fast.bench.flux_shapes import FLUX_DEV_TRANSFORMER, transformer_step_flops

    records = [e2e_record("2048x2048", 0.2, 0.7, stage="stage1")]
    inputs = pm.measured_inputs(records, pm.STAGES["4k"], FLUX_DEV_TRANSFORMER, 512, "x")
    flops = lambda sides: sum(transformer_step_flops(FLUX_DEV_TRANSFORMER, n * n, 512) for n in sides) / len(sides)  # noqa: E731
    two_k = flops([129, 128] * 8)  # 16 steps: even ones on the padded 258-latent grid
    four_k = flops([257, 256] * 5)
    guidance_2k = 8.25 * 16 * 256 * 256 * 4 / 3.0e12
    assert inputs.transformer_step_s == pytest.approx((0.7 - guidance_2k) * four_k / two_k)
    assert inputs.entry_s == pytest.approx(0.2 * (4096**2 + 2048**2) / (2048**2 + 1024**2))
    assert all("scaled" in inputs.sources[k] for k in ("entry_s", "transformer_step_s"))


# ---- the command -----------------------------------------------------------------------------


def test_command_labels_everything_a_model(tmp_path, capsys):
    from hiflow_fast.bench import bench_parallel_model

    measured = tmp_path / "e2e.json"
    measured.write_text(json.dumps([e2e_record("4096x4096", 0.9, 6.0)]))
    out, md = tmp_path / "model.json", tmp_path / "model.md"
    status = bench_parallel_model.main(["--measured", str(measured), "--stages", "4k", "--gpus", "2,8",
                                        "--links", "nvlink4", "--json", str(out), "--markdown", str(md)])
    assert status == 0
    records = json.loads(out.read_text())
    assert {(r["path"], r["world_size"]) for r in records} == {("ulysses", 2), ("ring", 2), ("ulysses", 8), ("ring", 8), ("both", 8)}
    for r in records:
        assert r["note"] == "model, not a measurement" and r["kind"] == "model" and r["median_s"] is None
        assert r["inputs_measured"] is True and r["link"] == "nvlink4"
        assert 1 < r["modelled_speedup"] <= r["world_size"] and r["modelled_speedup"] <= r["modelled_overlapped_speedup"]
    text = md.read_text()
    assert text.count("model, not a measurement") >= 2 and "measured on one GPU" in text
    assert "Goal: modelled 4k-stage speedup on 8 GPUs over nvlink4" in text


def test_command_measured_only_leaves_out_unmeasured_stages(tmp_path):
    from hiflow_fast.bench import bench_parallel_model

    cpu_run = tmp_path / "e2e.json"
    cpu_run.write_text(json.dumps([e2e_record("4096x4096", 5.0, 60.0, device="cpu")]))
    out = tmp_path / "model.json"
    assert bench_parallel_model.main(["--measured", str(cpu_run), "--measured-only", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == []


@pytest.mark.parametrize("argv, flag", [(["--gpus", "1"], "--gpus"), (["--modes", "tp"], "--modes"),
                                        (["--links", "infiniband"], "--links"), (["--stages", "8k"], "--stages"),
                                        (["--measured", "/nonexistent.json"], "--measured")])
def test_command_refuses_bad_input(argv, flag, capsys):
    from hiflow_fast.bench import bench_parallel_model

    assert bench_parallel_model.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err


# ---- the stage entry: VAE tiles split round robin across ranks ---------------------------------


def test_entry_share_is_the_busiest_ranks():
    # 9 decode tiles and 36 encode tiles of equal work on 8 ranks: rank 0 gets tiles 0 and 8 of
    # the decode and 0, 8, 16, 24, 32 of the encode, 7 of 45.
    assert pm.entry_share([[1.0] * 9, [1.0] * 36], 8) == pytest.approx(7 / 45)
    assert pm.entry_share([[4.0, 1.0]], 2) == pytest.approx(4 / 5)
    assert pm.entry_share([[1.0, 2.0, 3.0]], 1) == 1.0


def test_entry_tiles_and_bytes_by_hand():
    vae = {"sample_size": 64, "block_out_channels": [1, 1, 1, 1], "out_channels": 3, "latent_channels": 16}
    stage = pm.StageSpec("t", 128, 128, 3, (64, 64))
    # Decode of 64 px (8 latent px, one 8-px tile: no tiling); encode of 128 px in 64-px tiles
    # every 48 px: rows and columns of 64, 64, 32 px.
    sides = [64, 64, 32]
    encode = [(h, w) for h in sides for w in sides]
    assert pm.entry_tiles(stage, vae) == [[64 * 64], [h * w for h, w in encode]]
    outputs = [3 * 64 * 64] + [32 * (h // 8) * (w // 8) for h, w in encode]
    # 2 ranks: decode tile 0 -> rank 0; encode tiles 0, 2, 4, 6, 8 -> rank 0, the others rank 1.
    own = [outputs[0] + sum(outputs[1::2]), sum(outputs[2::2])]
    assert pm.entry_bytes(stage, vae, 2, 2) == (sum(outputs) - min(own)) * 2


def test_prediction_with_a_split_entry():
    stage = pm.StageSpec("t", 64, 64, 3, (32, 32))
    inputs = pm.StageInputs(stage, entry_s=2.0, transformer_step_s=8.0, guidance_step_s=0.5)
    link = pm.Link("test", 1e6, "a test")
    replicated = pm.predict(inputs, 2, 1, link, config(), 4, 2, latency_s=0.0)
    split = pm.predict(inputs, 2, 1, link, config(), 4, 2, latency_s=0.0, entry_share=0.6, entry_bytes=5e5)
    assert split.parallel_s == pytest.approx(replicated.parallel_s - 2.0 + 2.0 * 0.6 + 0.5)
    assert split.outside_transformer_s == pytest.approx(2.0 * 0.6 + 0.5 + 3 * 0.5)
