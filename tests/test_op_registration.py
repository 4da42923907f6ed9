"""The GPU registration path of every hiflow_fast:: op, traced on any machine.

The suite runs the kernels through Triton's CPU interpreter, where the ops are opaque custom ops
(hiflow_fast.ops.registration). On a GPU they are triton_ops launching through wrap_triton, a path
whose torch API differs between the torch versions setup.py allows (2.11 refused what 2.13
accepts). Here, in a subprocess without TRITON_INTERPRET (kernels compiled-mode JITFunctions, no
GPU needed), AOT export over fake CUDA tensors traces each op down to its Triton kernels, as
torch.compile does before Inductor: each kernel must appear as a functional Triton HOP with the
arguments the op passes. CI runs this on torch 2.13 and 2.11.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TRACE = r"""
import json
import torch
from torch._functorch.aot_autograd import aot_export_module
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.autotuner import Autotuner

from hiflow_fast.ops import guidance_ops
from hiflow_fast.ops.flash_attention import RopeSpec, flash_attention, flash_attention_with_lse
from hiflow_fast.ops.qk_norm_rope import qk_norm_rope
from hiflow_fast.ops.registration import is_interpreted

assert not guidance_ops.INTERPRETED and not is_interpreted(guidance_ops.guided_velocity_kernel)
ops = torch.ops.hiflow_fast


class AllOps(torch.nn.Module):
    def forward(self, sample, model_output, ref_x0, q, k, v, ids):
        hw, ref_hw = (10, 14), (6, 8)
        pred_x0 = torch.empty_like(sample)
        diff = torch.empty(2, 4, *hw, device=sample.device)
        ops.reference_flow(sample, model_output, ref_x0, ref_hw[0], ref_hw[1], 0.6, pred_x0, diff)
        ops.spectral_lowpass_blend(diff, 0.2, 4, 0.7)
        ops.haar_lowpass_blend(diff, 0.7)
        x_next, v_new, v_ref = torch.empty_like(sample), torch.empty_like(sample), torch.empty_like(sample)
        ops.guided_velocity(sample, pred_x0, diff, ref_x0, None, None, ref_hw[0], ref_hw[1], hw[0], hw[1], hw[0], hw[1],
                            0.6, 0.55, 0.3, 0, x_next, v_new, v_ref)
        qn, kn = qk_norm_rope(q, k, ids=ids, axes_dim=[8, 12, 12], theta=10000.0)
        out = flash_attention(qn, kn, v)
        out_rope = flash_attention(q, k, v, rope=RopeSpec(ids, (8, 12, 12)))
        out_lse, lse = flash_attention_with_lse(qn, kn, v)
        return x_next, v_new, v_ref, out, out_rope, out_lse, lse


with FakeTensorMode():
    cuda = torch.device("cuda")
    sample, model_output = torch.empty(2, 35, 16, device=cuda), torch.empty(2, 35, 16, device=cuda)
    ref_x0 = torch.empty(2, 12, 16, device=cuda)
    q, k, v = (torch.empty(2, 40, 3, 32, device=cuda, dtype=torch.bfloat16) for _ in range(3))
    ids = torch.empty(40, 3, device=cuda)
    graph, _ = aot_export_module(AllOps(), [sample, model_output, ref_x0, q, k, v, ids], trace_joint=False)

# The lse op's traced outputs (the graph's last two): out like q, lse [B, S_q, H] fp32.
out_lse, lse = (node.meta["val"] for node in next(n for n in graph.graph.nodes if n.op == "output").args[0][-2:])
assert out_lse.shape == (2, 40, 3, 32) and out_lse.dtype == torch.bfloat16, (out_lse.shape, out_lse.dtype)
assert lse.shape == (2, 40, 3) and lse.dtype == torch.float32, (lse.shape, lse.dtype)

kernels = []
for node in graph.graph.nodes:
    if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
        kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
        kernel = kernel.fn if isinstance(kernel, Autotuner) else kernel  # the autotuned attention
        name = kernel.__name__
        if name == "flash_attention_kernel":  # which variant: with or without the lse store
            # Constants sit in the node's kwargs or, on some torch versions, in the side table.
            args = {**kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]), **node.kwargs["kwargs"]}
            name += f" STORE_LSE={args['STORE_LSE']}"
        kernels.append(name)
    assert not str(node.target).startswith("hiflow_fast."), f"op left opaque: {node.target}"
print("KERNELS", json.dumps(kernels))
"""


def test_gpu_path_traces_every_op_into_its_triton_kernels(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # cwd outside the repository: the source folder hiflow_fast/ lacks the installed kernels.
    proc = subprocess.run([sys.executable, "-c", TRACE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("KERNELS "))
    kernels = json.loads(line.removeprefix("KERNELS "))
    assert kernels == [
        "reference_flow_kernel",
        "spectral_lowpass_kernel",
        "haar_lowpass_kernel",
        "guided_velocity_kernel",
        "qk_norm_rope_kernel",
        "flash_attention_kernel STORE_LSE=False",
        # RoPE with the attention: one rotation pass (qk_norm_rope's kernel, norm off), then the
        # plain attention kernel (see kernels/flash_attention.py for why not on load).
        "qk_norm_rope_kernel",
        "flash_attention_kernel STORE_LSE=False",
        # flash_attention_with_lse: the same kernel with the lse store compiled in.
        "flash_attention_kernel STORE_LSE=True",
    ]
