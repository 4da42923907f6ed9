"""The offline compile matrix, reduced (bench/bench_compile.py --reduced): every config the
attention autotuner may select for bf16 at head dims 128 and 256 (at 128 also the log-sum-exp
variant ring attention calls), and the RoPE pass, compiled with the real Triton JIT and ptxas
for sm_80, sm_86, sm_89 and sm_90, with no GPU.

Fails when a selectable config cannot launch (shared memory over the target's per-block limit)
or when the default Flux path (bf16, head dim 128, RoPE done by qk_norm_rope, so attention
without RoPE; with or without the lse store) spills. The compile runs in a subprocess (this session's kernels are interpreted:
TRITON_INTERPRET=1) with a private, empty Triton cache, so every kernel is really compiled:
~2-4 minutes on 2 cores. Deselect with `-m "not compile_matrix"`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hiflow_fast.bench import bench_compile
from hiflow_fast.bench.offline_compile import SHARED_LIMIT, parse_ptxas_log

TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90")


# Two processes (CI has 2 cores), about equal work: sm_90 tunes 7 configs at head dim 128.
TARGET_GROUPS = ("90", "80,86,89")


@pytest.fixture(scope="module")
def reduced_matrix(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(folder / "triton-cache")
    # -P and a neutral cwd: the repository root's hiflow_fast/ must not shadow the installed
    # package (hiflow_fast.bench exists only there).
    jobs = [
        subprocess.Popen(
            [sys.executable, "-P", "-m", "hiflow_fast.bench.bench_compile", "--reduced", "--targets", group,
             "--json", str(folder / f"matrix{i}.json")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=folder,
        )
        for i, group in enumerate(TARGET_GROUPS)
    ]
    outputs = [job.communicate(timeout=900)[0] for job in jobs]
    rows = []
    for i in range(len(TARGET_GROUPS)):
        path = folder / f"matrix{i}.json"
        rows += json.loads(path.read_text()) if path.exists() else []
    return [job.returncode for job in jobs], "\n".join(outputs), rows


@pytest.mark.compile_matrix
def test_every_selectable_config_launches_and_the_default_path_does_not_spill(reduced_matrix):
    codes, output, rows = reduced_matrix
    assert codes == [0] * len(TARGET_GROUPS), output[-5000:]
    assert bench_compile.failures(rows) == []
    attention = [r for r in rows if r["kernel"] == "flash_attention_kernel"]
    for target in TARGETS:
        default = [r for r in attention if r["target"] == target and r["default_path"]]
        assert default, f"no default-path config compiled for {target}"
        assert all(r["spill_bytes"] == 0 and r["launchable"] for r in default)
        # Both variants of the default path: plain and with the lse store (ring attention).
        assert {r["lse"] for r in default} == {False, True}, f"default path lacks a variant on {target}"
        wide = [r for r in attention if r["target"] == target and r["head_dim"] == 256]
        assert wide and all(r["launchable"] for r in wide), f"head dim 256 cannot launch on {target}"
        rope_pass = [r for r in rows if r["target"] == target and r["kernel"] == "qk_norm_rope_kernel"]
        assert rope_pass and all(r["launchable"] and r["spill_bytes"] == 0 for r in rope_pass)


@pytest.mark.compile_matrix
def test_pruning_bound_holds_for_every_compiled_config(reduced_matrix):
    """The autotuner prunes with kernels.flash_attention.shared_bytes_needed before compiling:
    it must never be below what the compiler allocated, or a pruned-in config could not launch."""
    from hiflow_fast.kernels.flash_attention import shared_bytes_needed

    _, _, rows = reduced_matrix
    checked = 0
    for r in rows:
        if r["kernel"] != "flash_attention_kernel":
            continue
        bm, bn = (int(x) for x in r["config"].split()[0].split("x"))
        stages = int(r["config"].split()[-1][1:])
        block_d = max(16, 1 << (r["head_dim"] - 1).bit_length())
        cc = int(r["target"][3:])
        assert shared_bytes_needed(bm, bn, block_d, 2, stages, cc) >= r["shared_bytes"], r
        checked += 1
    assert checked


def test_failures_flags_unlaunchable_and_spilling_rows():
    base = dict(kernel="flash_attention_kernel", target="sm_86", dtype="bf16", head_dim=128, rope=False, lse=False,
                config="128x64 w8 s3", shared_bytes=98304, shared_limit=SHARED_LIMIT[86], launchable=True,
                registers=255, spill_bytes=0, selectable=True, default_path=True, error=None)
    assert bench_compile.failures([base]) == []
    assert len(bench_compile.failures([dict(base, launchable=False)])) == 1
    assert len(bench_compile.failures([dict(base, spill_bytes=8)])) == 1
    assert bench_compile.failures([dict(base, spill_bytes=8, default_path=False)]) == []
    assert bench_compile.failures([dict(base, launchable=False, selectable=False)]) == []


def test_ptxas_report_parsing():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_86'\n"
           "ptxas info    : Function properties for k\n"
           "    504 bytes stack frame, 480 bytes spill stores, 480 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 504 bytes cumulative stack size\n")
    assert parse_ptxas_log(log) == (255, 480, 504)
