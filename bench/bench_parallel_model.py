"""The scaling model of multi-GPU HiFlow (bench/parallel_model.py): modelled stage times -- a
model, not a measurement.

    hiflow-fast bench parallel_model --measured gpu_check.json --json model.json --markdown model.md
    hiflow-fast bench parallel_model                      # every input assumed (H100 rates), labelled so
    hiflow-fast bench parallel_model --stages 4k --gpus 8 --modes ulysses --links nvlink4,pcie5

For FLUX.1-dev's 4K and 2K stages of the official plan, N GPUs and Ulysses / ring / both: the
predicted stage time (the entry's VAE tiles split across ranks + replicated guidance steps +
transformer / N + communication / link bandwidth, not overlapped; and the overlapped bound), speedup and efficiency against one
GPU, and the bytes each step moves. Inputs measured on one GPU when --measured names a JSON of a
GPU run (bench e2e, or bench/gpu_check's gpu_check.json), else assumed; every table and record
says which. Runs in seconds and needs no GPU (without --measured the VAE FLOP count takes ~15 s
on a small CPU, once).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hiflow_fast.bench import parallel_model as pm
from hiflow_fast.bench.common import Outputs, bench_main, comma_list, markdown_table
from hiflow_fast.errors import HiFlowInputError

BENCH_NAME = "parallel_model"
MODES = ("ulysses", "ring", "both")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# The goal: the modelled 4K-stage speedup on 8 H100s over NVLink.
GOAL = ("4k", 8, "nvlink4", 6.5)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hiflow-fast bench parallel_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", type=Path, nargs="+", metavar="FILE",
                        help="JSON files of a single-GPU GPU run: bench e2e (and bench guidance) records, or "
                             "gpu_check.json (default: none; every input assumed)")
    parser.add_argument("--measured-only", action="store_true",
                        help="leave out a stage whose inputs the --measured files do not give, instead of assuming them "
                             "(bench/gpu_check: seconds, no FLOP counting of the VAE)")
    parser.add_argument("--stages", default="4k,2k", help=f"comma list of {', '.join(pm.STAGES)}")
    parser.add_argument("--gpus", default="2,4,8", help="comma list of GPU counts (>= 2)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of ulysses, ring, both")
    parser.add_argument("--links", default="nvlink4,pcie5", help=f"comma list of {', '.join(pm.LINKS)}")
    parser.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bfloat16", help="dtype of the moved activations")
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) to this file")
    parser.add_argument("--markdown", type=Path, help="write the tables to this markdown file")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    # `bench all` passes these to every benchmark; the model measures nothing and ignores them.
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cpu-allocator", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.stages = comma_list("--stages", args.stages, tuple(pm.STAGES))
    args.modes = comma_list("--modes", args.modes, MODES)
    args.links = comma_list("--links", args.links, tuple(pm.LINKS))
    gpus = []
    for item in (g.strip() for g in args.gpus.split(",") if g.strip()):
        if not item.isdigit() or int(item) < 2:
            raise HiFlowInputError("--gpus", item, "GPU counts, integers >= 2")
        gpus.append(int(item))
    if not gpus or not args.stages or not args.modes or not args.links:
        raise HiFlowInputError("--stages/--gpus/--modes/--links", "", "at least one of each")
    args.gpus = gpus
    return args


def _main(argv: list[str] | None) -> int:
    from hiflow_fast.bench import flux_shapes as fs
    from hiflow_fast.bench.common import git_commit, _package_version

    args = _parse(argv)
    outputs = Outputs(args.json, args.markdown, overwrite=args.overwrite)
    records_in = pm.load_records(args.measured) if args.measured else None
    size = fs.model_size("full")
    transformer, text_tokens, vae = size.transformer, size.text_tokens, size.vae
    environment = {"versions": {"torch": _package_version("torch"), "diffusers": _package_version("diffusers")},
                   "commit": git_commit()}

    inputs: dict[str, pm.StageInputs] = {}
    for name in args.stages:
        stage = pm.STAGES[name]
        shown = ", ".join(str(p) for p in args.measured or [])
        found = pm.measured_inputs(records_in, stage, transformer, text_tokens, shown) if records_in else None
        if found is None and args.measured_only:
            print(f"  {name}: left out: {shown or 'no --measured file'} holds no single-GPU e2e record of the full model on a GPU")
            continue
        if records_in is not None and found is None:
            print(f"  {shown}: no single-GPU e2e record of the full model on a GPU; {name} inputs assumed")
        inputs[name] = found or pm.assumed_inputs(stage, transformer, text_tokens)

    records, sections = [], []
    if not inputs:
        sections.append("No stage modelled: no GPU measurement was given (--measured-only). "
                        "`hiflow-fast bench parallel_model` without it models every input as assumed.\n")
    for name, stage_inputs in inputs.items():
        kind = "measured on one GPU" if stage_inputs.measured else "ASSUMED (no GPU measurement given)"
        lines = [f"### {name} stage ({stage_inputs.stage.size}, {stage_inputs.stage.steps} steps) -- {pm.MODEL_LABEL}", "",
                 f"Single-GPU inputs, {kind} ({stage_inputs.device_name}): entry {stage_inputs.entry_s:.3f} s, "
                 f"transformer step {stage_inputs.transformer_step_s:.3f} s, guidance step {stage_inputs.guidance_step_s * 1e3:.2f} ms; "
                 f"one GPU: {stage_inputs.single_s:.2f} s.", ""]
        lines += [f"- {key}: {source}" for key, source in stage_inputs.sources.items()] + [""]
        rows = []
        tiles = pm.entry_tiles(stage_inputs.stage, vae)  # the entry's VAE tiles, split across ranks
        for link_id in args.links:
            link = pm.LINKS[link_id]
            for gpus in args.gpus:
                for mode in args.modes:
                    try:
                        ulysses, ring = pm.degrees(mode, gpus)
                    except HiFlowInputError:
                        continue  # 'both' needs a GPU count with a factor
                    if ulysses > 1 and transformer["num_attention_heads"] % ulysses and not _pads(transformer, ulysses):
                        continue  # diffusers cannot split FLUX's 24 heads over this degree
                    world = ulysses * ring
                    p = pm.predict(stage_inputs, ulysses, ring, link, transformer, text_tokens, DTYPE_BYTES[args.dtype],
                                   entry_share=pm.entry_share(tiles, world),
                                   entry_bytes=pm.entry_bytes(stage_inputs.stage, vae, world, DTYPE_BYTES[args.dtype]))
                    record = pm.as_record(p, stage_inputs, link_id, environment)
                    records.append(record)
                    rows.append(dict(link=link_id, gpus=gpus, mode=f"{mode} (u{ulysses} r{ring})", single=p.single_s,
                                     parallel=p.parallel_s, speedup=p.speedup, efficiency=p.efficiency,
                                     overlapped=p.overlapped_speedup, comm_rank=p.comm_bytes_per_step_rank / 1e9,
                                     comm_total=p.comm_bytes_per_step_total / 1e9, comm_ms=p.comm_s_per_step * 1e3,
                                     compute=p.compute_s_per_step, outside=p.outside_transformer_s))
        columns = [("link", "link"), ("GPUs", "gpus"), ("mode", "mode"), ("1 GPU s", "single"),
                   ("modelled N GPUs s", "parallel"), ("modelled speedup", "speedup"), ("efficiency", "efficiency"),
                   ("speedup if overlapped", "overlapped"), ("GB/step busiest rank", "comm_rank"),
                   ("GB/step all ranks", "comm_total"), ("comm ms/step", "comm_ms"), ("transformer/N s/step", "compute"),
                   ("entry (split) + guidance (replicated) s", "outside")]
        sections.append("\n".join(lines) + "\n" + markdown_table(rows, columns) + "\n")
    outputs.add(records)
    goal = _goal_line(records)
    links = "; ".join(f"{pm.LINKS[i].name}: {pm.LINKS[i].bytes_per_s / 1e9:.0f} GB/s per direction ({pm.LINKS[i].source})"
                      for i in args.links)
    markdown = (
        f"# Multi-GPU scaling of HiFlow (FLUX.1-dev) -- {pm.MODEL_LABEL}\n\n"
        f"Stage time on N GPUs = stage entry (VAE round trip, its tiles split round robin across the ranks: the busiest "
        f"rank's share, plus the tiles it receives over the link) + guidance steps (replicated) + transformer / N "
        f"+ communication / link bandwidth per step (not overlapped, as diffusers runs it; the overlapped bound "
        f"alongside) + {pm.ASSUMED_COLLECTIVE_LATENCY_S * 1e6:.0f} us per collective (assumed). Communication: "
        f"the bytes the busiest rank sends or receives per step, counted from the shapes ({args.dtype}). "
        f"Links: {links}.\n\n{goal}\n\n" + "\n".join(sections)
    )
    print(markdown)
    outputs.finish(markdown, title=f"parallel model -- {pm.MODEL_LABEL}")
    return 0


def _pads(transformer, ulysses: int) -> bool:
    """diffusers pads the heads when it needs fewer padding heads than each rank then holds."""
    heads = transformer["num_attention_heads"]
    pad = (-heads) % ulysses
    return pad < (heads + pad) // ulysses


def _goal_line(records: list[dict]) -> str:
    stage, gpus, link, target = GOAL
    hits = [r for r in records if r["stage"] == stage and r["world_size"] == gpus and r["link"] == link]
    if not hits:
        return f"Goal ({stage} stage, {gpus} GPUs, {link}, >= {target}x): not in this run's selection."
    best = max(hits, key=lambda r: r["modelled_speedup"])
    inputs = "inputs measured on one GPU" if best["inputs_measured"] else "inputs ASSUMED"
    verdict = "meets" if best["modelled_speedup"] >= target else "misses"
    return (f"Goal: modelled {stage}-stage speedup on {gpus} GPUs over {link} >= {target}x: best "
            f"{best['modelled_speedup']:.2f}x ({best['path']}), {verdict} it ({pm.MODEL_LABEL}; {inputs}).")


main = bench_main(_main)

if __name__ == "__main__":
    sys.exit(main())
