"""Adapter codec: LoRA tensors in a PEFT model <-> numpy dicts <-> Flower ArrayRecords.

Keys are PEFT's saved names (adapter name stripped), e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` — the same keys as
``adapter_model.safetensors``, so a global adapter can be written as a PEFT directory as-is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

ADAPTER_NAME = "default"


class AdapterMismatch(ValueError):
    """Received adapter tensors do not fit this site's model (different model or LoRA config)."""


def _saved_key(param_name: str) -> str:
    return param_name.replace(f".{ADAPTER_NAME}.", ".")


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """PEFT saved-key -> live LoRA parameter of the model (the tensors a site trains and sends)."""
    return {_saved_key(n): p for n, p in model.named_parameters() if ".lora_" in n}


def get_adapter_arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Copy the LoRA tensors out as float32 numpy arrays; lora_A (r, in), lora_B (out, r)."""
    return {k: p.detach().float().cpu().numpy().copy() for k, p in lora_parameters(model).items()}


def check_adapter_keys(params: Mapping[str, torch.Tensor], arrays: Mapping[str, np.ndarray]) -> None:
    """Raise AdapterMismatch unless keys and shapes agree exactly."""
    missing = sorted(set(params) - set(arrays))
    extra = sorted(set(arrays) - set(params))
    if missing or extra:
        raise AdapterMismatch(
            f"adapter keys differ from this model's LoRA layers: {len(missing)} missing {missing[:2]}, "
            f"{len(extra)} unexpected {extra[:2]} (same model.* and lora.* config on both sides?)"
        )
    for key, param in params.items():
        if tuple(param.shape) != tuple(np.shape(arrays[key])):
            raise AdapterMismatch(f"shape of {key}: model {tuple(param.shape)} vs received {np.shape(arrays[key])}")


@torch.no_grad()
def set_adapter_arrays(model: torch.nn.Module, arrays: Mapping[str, np.ndarray],
                       params: Mapping[str, torch.nn.Parameter] | None = None) -> dict[str, torch.Tensor]:
    """Copy adapter arrays into the model's LoRA parameters in place (the base stays resident); returns the arrays as
    float32 tensors on the parameters' device (what trained_delta subtracts: no second copy from the host).

    params: lora_parameters(model), where the caller keeps it (it walks every module of the model).
    """
    params = lora_parameters(model) if params is None else params
    check_adapter_keys(params, arrays)
    devices = {param.device for param in params.values()}
    if len(devices) != 1:  # a model split over devices: tensor by tensor
        placed = {key: torch.from_numpy(np.ascontiguousarray(arrays[key], dtype=np.float32)).to(param.device)
                  for key, param in params.items()}
    else:
        # One host-to-device copy of them all (a GPU waits for one pinned copy, not for one pageable copy per
        # tensor: 448 at llama-8b all-linear), then one multi-tensor copy into the parameters.
        flat = to_device_flat([arrays[key] for key in params], devices.pop())
        placed = dict(zip(params, split_flat(flat, [tuple(param.shape) for param in params.values()])))
    torch._foreach_copy_(list(params.values()), list(placed.values()))
    return placed


def to_device_flat(arrays: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """The arrays concatenated into one flat float32 tensor on `device`; to a GPU through pinned memory, one copy."""
    size = sum(int(np.size(a)) for a in arrays)
    host = torch.empty(size, dtype=torch.float32, pin_memory=device.type == "cuda")
    if size:
        np.concatenate([np.asarray(a, np.float32).reshape(-1) for a in arrays], out=host.numpy())
    return host.to(device, non_blocking=True)


def adapter_delta(local: Mapping[str, np.ndarray], global_: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """local - global, key by key (what a site uploads)."""
    return {k: (np.asarray(local[k], np.float32) - np.asarray(global_[k], np.float32)) for k in global_}


@torch.no_grad()
def trained_delta(params: Mapping[str, torch.nn.Parameter],
                  global_: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """trained - global as float32 tensors on the model's device, from the LoRA parameters (lora_parameters(model))
    and the global adapter as set_adapter_arrays placed it; bit for bit adapter_delta (one IEEE float32 subtraction).

    The delta stays on the device: the upload codec decides what of it comes to the host (host_arrays, or only a
    compressed payload: federation/compression.py).
    """
    return {k: params[k].detach().float() - global_[k] for k in global_}


def to_numpy(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """The tensors' values as numpy arrays on the host: CPU tensors shared, not copied; CUDA ones copied each into
    pinned memory without blocking, then one wait for them all (so the copies run back to back)."""
    hosted, streams = [], set()
    for tensor in tensors:
        tensor = tensor.detach()
        if tensor.device.type == "cpu":
            hosted.append(tensor)
            continue
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        hosted.append(host)
        streams.add(torch.cuda.current_stream(tensor.device))
    for stream in streams:
        stream.synchronize()
    return [tensor.numpy() for tensor in hosted]


def split_flat(flat: np.ndarray | torch.Tensor, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray | torch.Tensor]:
    """Views of a flat array (numpy or torch) as consecutive tensors of these shapes (a torch.cat of them, flattened)."""
    views, offset = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return views


def host_arrays(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """float32 numpy arrays of tensors on one device: from CUDA in one copy of them all, CPU ones shared."""
    values = [t.detach().float() for t in tensors.values()]
    if all(v.device.type == "cpu" for v in values):
        return {k: v.numpy() for k, v in zip(tensors, values)}
    (flat,) = to_numpy([torch.cat([v.reshape(-1) for v in values])])
    return dict(zip(tensors, split_flat(flat, [tuple(v.shape) for v in values])))


def adapter_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over sorted keys, dtypes, shapes and bytes: equal digests mean bit-identical adapters."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def num_elements(arrays: Mapping[str, np.ndarray]) -> int:
    """Total scalar count."""
    return int(sum(np.size(v) for v in arrays.values()))


def to_array_record(arrays: Mapping[str, np.ndarray], dtype: str = "float32"):
    """numpy dict -> Flower ArrayRecord, cast to the transport dtype and packed into one Array
    (federation/packing.py: one Flower object per message instead of one per tensor)."""
    from federation.packing import pack_arrays

    return pack_arrays({k: np.asarray(v, dtype=dtype) for k, v in arrays.items()})


def from_array_record(record) -> dict[str, np.ndarray]:
    """Flower ArrayRecord (packed, or one Array per tensor) -> numpy dict (float32 for arithmetic)."""
    from federation.packing import unpack_arrays

    return {k: np.asarray(v, dtype=np.float32) for k, v in unpack_arrays(record).items()}
