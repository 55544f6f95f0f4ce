"""A stand-in for a GPU on the CPU: tensors on a device that is not the host, holding real values.

A CUDA tensor differs from a CPU tensor in what a program may do with it, not in its numbers: it
cannot become a NumPy array, seed a CPU generator or meet a CPU tensor in one op, and reading a
value from it (``.item()``, ``.cpu()``, ``.tolist()``, ``float(t)``) waits for the GPU. This
module gives CPU tests a device with exactly those rules, on which whole programs still run to
the end (training, checkpoints, resume, evaluation), so every path around training is checked,
not just the first step:

- A stand-in tensor says it is on ``meta`` (the one non-CPU device every build of torch has)
  and keeps its values in a CPU tensor inside. Every op unwraps, computes on the CPU and wraps
  the result again, under ``StandInDevice``, a dispatch mode that sees every op.
- Where PyTorch refuses a CUDA tensor it refuses a stand-in one, with its own checks (the device
  type is not CPU): ``.numpy()``, ``Generator.set_state``, ``torch.from_numpy``-style paths; an
  aten op mixing a stand-in tensor with a CPU tensor of one or more dimensions fails as it does
  on a GPU ("Expected all tensors to be on the same device"). 0-dim CPU tensors may join, as
  they may on a GPU.
- Every crossing between host and device is counted in ``syncs``: a value read or a copy to
  the host (the GPU waits), and a copy from the host to the device (``to_device``; blocking from
  pageable memory). Tests read how many a training step costs.
- A generator asked for on the stand-in device draws on the CPU (a real device generator needs a
  device runtime); the mode puts what it draws on the device. Its ``get_state`` is a CPU byte
  tensor, as a CUDA generator's is, and ``set_state`` refuses a device tensor as CUDA's does.

What it does not model: streams, events, memory, NCCL. Collectives run through gloo on the
values inside (``c10d`` ops are unwrapped like any other op).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")
_HOST = torch.device("cpu")
_RealGenerator = torch.Generator


def _on_standin(device: Any) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


class StandInTensor(torch.Tensor):
    """A tensor on the stand-in device; ``elem`` holds its values on the CPU."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> StandInTensor:
        return torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=DEVICE,
            requires_grad=elem.requires_grad,
        )

    def __init__(self, elem: torch.Tensor) -> None:
        self.elem = elem

    def __repr__(self) -> str:
        return f"StandInTensor({self.elem!r})"

    def __reduce_ex__(self, protocol):
        """Saved as its values: ``torch.save`` writes a CUDA tensor's bytes too (loaded back to
        the CPU with ``map_location="cpu"``)."""
        return self.elem.__reduce_ex__(protocol)

    # A traceable wrapper subclass: Module.to()/.double() then swap whole tensors (values
    # included) instead of assigning ``.data``, which would leave ``elem`` behind.
    def __tensor_flatten__(self):
        return ["elem"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return StandInTensor(inner["elem"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func}: a stand-in tensor used outside StandInDevice")


class _HostCalls(TorchFunctionMode):
    """What torch does outside the dispatcher: ``torch.tensor(data, device=...)`` builds on the
    host and copies, as it does for CUDA (on meta, torch would make an empty tensor without
    dispatching any op); ``.tolist()`` copies to the host, ``.numpy()`` is refused, as for CUDA."""

    def __init__(self, device: StandInDevice) -> None:
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _on_standin(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": _HOST}).to(DEVICE)
        if func is torch.Tensor.tolist and isinstance(args[0], StandInTensor):
            self.device.syncs.append(("to_host", "tolist"))
            return args[0].elem.tolist()
        if func is torch.Tensor.numpy and isinstance(args[0], StandInTensor):  # CUDA's refusal
            raise TypeError(
                f"can't convert {DEVICE.type} device type tensor to numpy. Use "
                "Tensor.cpu() to copy the tensor to host memory first."
            )
        return func(*args, **kwargs)


class _GeneratorType(type(_RealGenerator)):
    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, _RealGenerator)


class _Generator(_RealGenerator, metaclass=_GeneratorType):
    """``torch.Generator(device)`` while the stand-in is on: one asked for on the stand-in
    device is a CPU generator (what it draws, the mode then places on the device)."""

    def __new__(cls, device: Any = "cpu") -> torch.Generator:
        return _RealGenerator(_HOST if _on_standin(device) else device)


class StandInDevice(TorchDispatchMode):
    """Runs every op of stand-in tensors on the CPU and counts host-device crossings.

    ``syncs``: one ``(kind, op)`` per crossing, kind ``item``, ``to_host`` or ``to_device``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        wrappers: dict[int, StandInTensor] = {}
        host_tensors = []

        def unwrap(x):
            if isinstance(x, StandInTensor):
                wrappers[id(x.elem)] = x
                return x.elem
            if isinstance(x, torch.Tensor):
                if x.device.type == DEVICE.type:
                    raise RuntimeError(f"{func}: a meta tensor without values met the stand-in device")
                if x.dim() > 0:
                    host_tensors.append(x)
            return x

        host_args, host_kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        on_device = bool(wrappers)
        if func is torch.ops.aten._local_scalar_dense.default:  # .item(), float(t), bool(t)
            if on_device:
                self.syncs.append(("item", str(func)))
            return func(*host_args, **host_kwargs)
        if func is torch.ops.aten._to_copy.default:
            target = kwargs.get("device")
            if on_device and target is not None and torch.device(target).type == "cpu":
                self.syncs.append(("to_host", str(func)))
                return func(*host_args, **host_kwargs)
            if not on_device and _on_standin(target):
                self.syncs.append(("to_device", str(func)))
                return StandInTensor(func(*host_args, **{**host_kwargs, "device": _HOST}))
        if func is torch.ops.aten.copy_.default:  # copies may cross devices
            dst, src = args[0], args[1]
            if isinstance(dst, StandInTensor) != isinstance(src, StandInTensor):
                self.syncs.append(("to_device" if isinstance(dst, StandInTensor) else "to_host", str(func)))
            func(*host_args, **host_kwargs)
            return dst
        if on_device and host_tensors and func.namespace == "aten":
            raise RuntimeError(
                f"{func}: Expected all tensors to be on the same device, but found "
                f"at least two devices, {DEVICE.type} and cpu!"
            )
        make_device_tensors = on_device
        if _on_standin(host_kwargs.get("device")):  # a factory: torch.zeros(..., device=...)
            host_kwargs["device"] = _HOST
            make_device_tensors = True
        out = func(*host_args, **host_kwargs)
        if not make_device_tensors:
            return out

        def wrap(x):
            if not isinstance(x, torch.Tensor):
                return x
            return wrappers[id(x)] if id(x) in wrappers else StandInTensor(x)  # in-place ops return their input

        return tree_map(wrap, out)


@contextlib.contextmanager
def standin_device() -> Iterator[StandInDevice]:
    """``with standin_device() as device:`` every op on ``DEVICE`` runs on the CPU and is
    counted; ``torch.Generator(DEVICE)`` gives a CPU generator. Yields the mode (``.syncs``)."""
    mode = StandInDevice()
    torch.Generator = _Generator
    try:
        with warnings.catch_warnings(), _HostCalls(mode), mode:
            # The stand-in's device type is meta, and loading a state dict into meta parameters
            # draws a warning (torch copies all the same); loading onto a GPU draws none.
            warnings.filterwarnings("ignore", message=".*to a meta parameter in the current model")
            yield mode
    finally:
        torch.Generator = _RealGenerator
