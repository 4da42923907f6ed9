"""The public op API: torch custom ops `hiflow_fast::*` backed by the Triton kernels in kernels/,
one module per group of ops, each registering a fake (meta) implementation so that
torch.compile(fullgraph=True) and CUDA-graph capture see through it; preallocated outputs are
declared as mutated in the schema.

Nothing is imported here: importing a module creates its kernels, and on a machine without CUDA
they must be created under Triton's interpreter (TRITON_INTERPRET=1 first). For the guidance
ops (`guidance_ops`) use `hiflow_fast.backend.load_triton_ops()`, which arranges that.
"""
