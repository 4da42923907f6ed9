"""Checks made before any weights are loaded: device, dtype, model files, prompt embeddings.

Each raises HiFlowInputError (or HiFlowModelError for a broken model folder) naming the field,
the value and what is allowed; the command line renames the field to its flag.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import torch

from .errors import HiFlowInputError, HiFlowModelError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Largest tensor the int32-indexed kernels address (elements).
INT32_ELEMENTS = 2**31 - 1


def available_devices() -> list[str]:
    """The device strings that work here: cpu, and cuda / cuda:N for each CUDA device."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def check_device(value: Any, field: str = "device") -> torch.device:
    """A torch.device that exists on this machine, from a string or a torch.device."""
    allowed = f"a device that exists here: {', '.join(available_devices())}"
    if not isinstance(value, (str, torch.device)):
        raise HiFlowInputError(field, value, allowed)
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise HiFlowInputError(field, value, allowed) from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HiFlowInputError(field, value, f"{allowed} (no CUDA device is available)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HiFlowInputError(field, value, allowed)
        return device
    if device.type == "mps" and "mps" in available_devices():
        return device
    raise HiFlowInputError(field, value, allowed)


def check_dtype(value: Any, field: str = "torch_dtype") -> torch.dtype:
    """torch.float32 / bfloat16 / float16, given as the dtype or its name."""
    allowed = f"one of {', '.join(DTYPES)} (a torch.dtype or its name)"
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
        raise HiFlowInputError(field, value, allowed)
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise HiFlowInputError(field, value, allowed)


# ---- files --------------------------------------------------------------------------------


def check_safetensors_file(path: str, field: str) -> dict:
    """The header of a safetensors file, after checking the file holds all the data it
    declares (a truncated or foreign file is refused without reading any tensor, and nothing
    is ever unpickled)."""
    allowed = "a readable, complete .safetensors file"
    if not os.path.isfile(path):
        raise HiFlowInputError(field, path, "an existing .safetensors file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HiFlowInputError(field, path, f"{allowed} (it has {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            # safetensors caps its JSON header at 100 MB; a longer one is another format (a pickle?).
            if header_len > 100_000_000:
                raise HiFlowInputError(field, path, f"{allowed} (not safetensors: a pickle or another format?)")
            if header_len > size - 8:
                raise HiFlowInputError(field, path, f"{allowed} (truncated: {size} bytes, its header alone needs {8 + header_len})")
            header = json.loads(f.read(header_len))
    except HiFlowInputError:
        raise
    except OSError as exc:
        raise HiFlowInputError(field, path, f"{allowed} ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError):
        raise HiFlowInputError(field, path, f"{allowed} (its header is not safetensors JSON)") from None
    if not isinstance(header, dict):
        raise HiFlowInputError(field, path, f"{allowed} (its header is not safetensors JSON)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise HiFlowInputError(field, path, f"{allowed} (tensor {name!r} has no data offsets)")
        end = max(end, int(offsets[1]))
    if 8 + header_len + end > size:
        raise HiFlowInputError(field, path, f"{allowed} (truncated: {size} of {8 + header_len + end} bytes)")
    return header


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise HiFlowModelError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HiFlowModelError(f"{what} {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HiFlowModelError(f"{what} {path!r} is not a JSON object")
    return data


def check_model_dir(root: str | os.PathLike, field: str = "model_dir") -> dict:
    """Check a diffusers-format Flux folder without loading weights; return the transformer's
    config. Weights must be safetensors and complete: pickled weights (.bin, .pt) are refused."""
    if not isinstance(root, (str, os.PathLike)):
        raise HiFlowInputError(field, root, "a path to a diffusers-format Flux folder")
    root = os.fspath(root)
    if not os.path.isdir(root):
        what = "is not a folder" if os.path.exists(root) else "does not exist"
        raise HiFlowModelError(f"model folder {root!r} {what}")
    configs = {}
    for sub, config_name in (("transformer", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            raise HiFlowModelError(
                f"model folder {root!r} has no {sub}/ subfolder; expected a diffusers-format Flux "
                "folder with transformer/, vae/ and scheduler/"
            )
        configs[sub] = _read_json(os.path.join(folder, config_name), f"{sub} config")
        if sub == "scheduler":
            continue
        names = os.listdir(folder)
        weights = sorted(n for n in names if n.endswith(".safetensors"))
        if not weights:
            pickled = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
            if pickled:
                raise HiFlowModelError(
                    f"{folder!r} holds only pickled weights ({', '.join(pickled)}); they are never "
                    "loaded (arbitrary code): convert them to safetensors"
                )
            raise HiFlowModelError(f"{folder!r} has no .safetensors weights")
        for name in weights:
            try:
                check_safetensors_file(os.path.join(folder, name), f"{sub}/{name}")
            except HiFlowInputError as exc:
                raise HiFlowModelError(f"could not load the model weights {os.path.join(folder, name)!r}: {exc.allowed}") from None
    transformer = configs["transformer"]
    for key in ("joint_attention_dim", "pooled_projection_dim", "num_attention_heads", "attention_head_dim"):
        if not isinstance(transformer.get(key), int):
            raise HiFlowModelError(f"transformer config of {root!r} lacks the integer {key!r}")
    return transformer


# ---- prompt embeddings ----------------------------------------------------------------------


def check_prompt_embeds(
    prompt_embeds: Any,
    pooled_prompt_embeds: Any,
    *,
    joint_attention_dim: int | None,
    pooled_projection_dim: int | None,
    max_sequence_length: int,
    fields: tuple[str, str] = ("prompt_embeds", "pooled_prompt_embeds"),
) -> None:
    """prompt_embeds [B, T, D] and pooled_prompt_embeds [B, P]: float torch tensors (numpy
    arrays are refused with the conversion to use), finite, T <= max_sequence_length, and D, P
    the model's when known."""
    embeds_field, pooled_field = fields
    for name, tensor in ((embeds_field, prompt_embeds), (pooled_field, pooled_prompt_embeds)):
        if tensor is None:
            raise HiFlowInputError(name, None, "a tensor (prompt_embeds and pooled_prompt_embeds go together)")
        if not isinstance(tensor, torch.Tensor):
            kind = type(tensor).__module__.split(".")[0] + "." + type(tensor).__name__
            raise HiFlowInputError(
                name, kind, "a torch.Tensor (convert a numpy array with torch.from_numpy(array))"
            )
        if not tensor.is_floating_point():
            raise HiFlowInputError(name, f"a tensor of {tensor.dtype}", "a floating-point tensor (float32, bfloat16 or float16)")
    d = joint_attention_dim
    if prompt_embeds.ndim != 3 or (d is not None and prompt_embeds.shape[-1] != d) or 0 in prompt_embeds.shape:
        raise HiFlowInputError(
            embeds_field, f"a tensor of shape {list(prompt_embeds.shape)}", f"shape [B, T, {d if d is not None else 'D'}] with B, T >= 1"
        )
    if prompt_embeds.shape[1] > max_sequence_length:
        raise HiFlowInputError(
            embeds_field,
            f"a tensor of shape {list(prompt_embeds.shape)}",
            f"at most max_sequence_length={max_sequence_length} tokens (T)",
        )
    p = pooled_projection_dim
    batch = prompt_embeds.shape[0]
    if pooled_prompt_embeds.ndim != 2 or pooled_prompt_embeds.shape[0] != batch or (p is not None and pooled_prompt_embeds.shape[1] != p):
        raise HiFlowInputError(
            pooled_field,
            f"a tensor of shape {list(pooled_prompt_embeds.shape)}",
            f"shape [{batch}, {p if p is not None else 'P'}] (one row per prompt of prompt_embeds)",
        )
    for name, tensor in ((embeds_field, prompt_embeds), (pooled_field, pooled_prompt_embeds)):
        if not bool(torch.isfinite(tensor).all()):
            raise HiFlowInputError(name, "a tensor with NaN/Inf", "finite values")


def check_index_range(field: str, batch: int, tokens: int, hidden: int, where: str) -> None:
    """The joint hidden state [batch, tokens, hidden] must stay addressable with int32 offsets."""
    elements = batch * tokens * hidden
    if elements > INT32_ELEMENTS:
        raise HiFlowInputError(
            field,
            batch,
            f"fewer images per call: {where} needs a hidden state of {batch} x {tokens} x {hidden} = "
            f"{elements:.3g} elements, over the 2**31 the kernels' 32-bit indexing addresses "
            f"(at most {max(1, math.floor(INT32_ELEMENTS / (tokens * hidden)))} images)",
        )
