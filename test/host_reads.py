"""Counting what would make a GPU wait, on a CPU: a tensor subclass that records every read of its
values on the host (bool(), .item(), .tolist(), .nonzero(), a copy to the CPU, ...)."""

import torch

HOST_READS = {"__bool__", "item", "tolist", "numpy", "nonzero", "__int__", "__float__", "__index__", "cpu", "to"}


class DeviceTensor(torch.Tensor):
    """A CPU tensor standing in for one on a GPU. A copy to the CPU returns a plain tensor, so
    host-side work on it is free, as it is on a real GPU; every result computed from a
    DeviceTensor is one too, so the reads a model makes downstream are all seen."""

    host_reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        targets = [a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))]
        to_host = name == "cpu" or (name == "to" and any(torch.device(a).type == "cpu" for a in targets))
        if name in HOST_READS and (name not in ("cpu", "to") or to_host):
            cls.host_reads.append(name)
        result = super().__torch_function__(func, types, args, kwargs)
        if to_host and isinstance(result, torch.Tensor):
            return result.as_subclass(torch.Tensor)
        return result


def on_device(encoded):
    """An EncodedObservation whose tokens and padding mask count host reads."""
    encoded.tokens = encoded.tokens.as_subclass(DeviceTensor)
    encoded.valid = encoded.valid.as_subclass(DeviceTensor)
    return encoded
