"""The device a benchmark runs on, its clock, and what it is (:func:`hardware_info`)."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from gradlens._errors import GradlensError

__all__ = ["hardware_info"]


def _parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` of type cpu or cuda (not yet checked to exist)."""
    expected = "`device` should be 'cpu', 'cuda' or 'cuda:N'"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise GradlensError(f"{expected}; found {device!r}.") from exc
    if dev.type not in ("cpu", "cuda"):
        raise GradlensError(f"{expected}; found {device!r} (device type {dev.type!r}).")
    return dev


def _check_device(dev: torch.device, given: object) -> torch.device:
    """``dev`` if this machine has it, with a CUDA index made explicit; else a GradlensError."""
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GradlensError(
            f"`device` should be 'cpu' on this machine (torch.cuda.is_available() is False, "
            f"torch {torch.__version__}); found {given!r}."
        )
    n = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= n:
        raise GradlensError(
            f"`device` should be 'cpu' or one of cuda:0..cuda:{n - 1} on this machine; "
            f"found {given!r}."
        )
    return torch.device("cuda", index)


def _device(device: str | torch.device) -> torch.device:
    return _check_device(_parse_device(device), device)


def _clock(clock: str, device: torch.device) -> Callable[[], float]:
    """The clock of ``clock`` ('wall' or 'cpu'); on CUDA it synchronizes before each read, so a
    step's end is read once its kernels have run, and its start once the previous work has."""
    if clock == "cpu":
        return time.thread_time
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.perf_counter


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware_info(device: str | torch.device = "cpu", clock: str = "wall") -> dict[str, Any]:
    """What the benchmark ran on: the device, its name and torch's version (on CPU, also the
    number of torch threads the timing used: 1 under ``clock="cpu"``).

    Example:
        >>> info = hardware_info("cpu")
        >>> info["device"], info["torch_threads"] >= 1, bool(info["name"])
        ('cpu', True, True)
    """
    dev = _device(device)
    info: dict[str, Any] = {"device": str(dev), "torch": torch.__version__}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    else:
        info["name"] = _cpu_name()
        info["torch_threads"] = 1 if clock == "cpu" else torch.get_num_threads()
    return info
