"""Triton kernels of hiflow_fast, one file per op. Installed as `hiflow_fast.kernels`.

Importing a kernel module needs Triton; the op layer (`hiflow_fast.ops`) decides once whether
it is available and falls back to the plain-PyTorch reference otherwise.
"""

if __name__ == "kernels":
    # Reached only when this folder is on sys.path itself (e.g. python run from the repository
    # root). A top-level `kernels` here would shadow huggingface's `kernels` package, which
    # diffusers imports, so refuse rather than resolve into this repository.
    raise ImportError(
        "the folder kernels/ of hiflow_fast is the package `hiflow_fast.kernels`, not a top-level "
        "`kernels` module; run from outside the repository root to reach huggingface's `kernels`"
    )
