"""Resumable training: one safetensors checkpoint file, written atomically."""

from __future__ import annotations

import json

import torch

from ..errors import BadInputError


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _save_checkpoint(path, net, opt, best_state, rng, gen, fingerprint: str, state: dict,
                     extra: dict | None = None) -> None:
    """Weights, best weights, optimiser and RNG states, counters: one safetensors file.

    ``extra``: more named tensors (the weight average), handed back by
    :func:`_load_checkpoint` as ``meta["extra"]``.
    """
    from safetensors.torch import save

    from ..io.files import write_bytes_atomic

    tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    for idx, slots in opt.state_dict()["state"].items():
        for name, value in slots.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
    tensors["rng.torch"] = gen.get_state()
    meta = {"fingerprint": fingerprint, "numpy_rng": rng.bit_generator.state, **state}
    write_bytes_atomic(path, save(tensors, metadata={"checkpoint": json.dumps(meta)}))


def _load_checkpoint(path, net, opt, best_state, rng, gen, fingerprint: str) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = json.loads((fh.metadata() or {})["checkpoint"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise BadInputError(f"cannot resume from {path}: not a training checkpoint ({exc})") from exc
    if meta.get("fingerprint") != fingerprint:
        raise BadInputError(f"checkpoint {path} is from a run with other data or settings")
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    best_state.update({k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
    opt_state = opt.state_dict()
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            slots.setdefault(int(idx), {})[name] = value
    opt_state["state"] = slots
    opt.load_state_dict(opt_state)
    gen.set_state(tensors["rng.torch"])
    rng.bit_generator.state = meta["numpy_rng"]
    meta["extra"] = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return meta
