"""Build tests/data/square.pt, the reduced copy of ../shared/golden/square.pt (<= 15 MB).

    python tests/data/make_reduced_golden.py [GOLDEN_DIR]

Kept: everything the conformance runner and tests read, except
* `final_image` (13 MB; the runner never needs it);
* per-step tensors that are exact functions of others: `sample` (the previous step's
  `prev_sample`, swin-padded or cropped, or at a stage's first step the re-noised guidance
  latents) and `original_pred_x0` (= sample - sigma * model_output). tests/test_golden_data.py
  checks bit for bit, against the full case when ../shared is present, that re-deriving them
  gives the recorded values;
* the unit-step tensors of the last high-res stage after its first step (`model_output`, the
  velocity states, `ref_pred_x0`, `freq_filter`): the 4225-token stage would take 10 MB more.
  Its latents after every step stay, so the end-to-end checks still cover it; its other unit
  checks run against the full case in ../shared.
`final_latents` is the last step's `prev_sample` and shares its storage (torch.save stores it once).
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DERIVED = ("sample", "original_pred_x0")
UNIT_ONLY = ("model_output", "model_output_high_out", "model_output_ref_out", "ref_pred_x0", "freq_filter")
MAX_BYTES = 15 * 1024 * 1024


def reduce_case(case: dict) -> dict:
    out = {k: v for k, v in case.items() if k not in ("final_image", "stages")}
    out["stages"] = []
    last = len(case["stages"]) - 1
    for k, stage in enumerate(case["stages"]):
        reduced = {key: value for key, value in stage.items() if key != "steps"}
        reduced["steps"] = []
        for i, step in enumerate(stage["steps"]):
            drop = set(DERIVED)
            if k == 0:
                drop |= {"model_output"}  # the base stage has no unit check
            if k == last and i > 0:
                drop |= set(UNIT_ONLY)
            reduced["steps"].append({key: value for key, value in step.items() if key not in drop})
        out["stages"].append(reduced)
    final = out["stages"][-1]["steps"][-1]["prev_sample"]
    if torch.equal(final, case["final_latents"]):
        out["final_latents"] = final
    return out


def main(argv: list[str]) -> int:
    golden = argv[0] if argv else os.path.join(HERE, "..", "..", "..", "shared", "golden")
    case = torch.load(os.path.join(golden, "square.pt"), weights_only=True)
    target = os.path.join(HERE, "square.pt")
    torch.save(reduce_case(case), target)
    shutil.copyfile(os.path.join(golden, "square.json"), os.path.join(HERE, "square.json"))
    size = os.path.getsize(target)
    print(f"{target}: {size / 2**20:.1f} MiB")
    return 0 if size <= MAX_BYTES else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
