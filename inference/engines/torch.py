"""PyTorch engine: TorchScript (``<version>/model.pt``) or an eager ``nn.Module``.

For development and as the speed baseline for the other engines. Runs on ``cuda:0`` when
``torch.cuda.is_available()``, else on CPU. ``run`` holds no shared mutable state besides the
module (inference mode, no autograd), so one instance may be shared by worker threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from inference.engines import EngineUnavailable, Tensors
from inference.engines._io import NamedIO, check_outputs
from inference.package import ModelPackage


def torch_status() -> str:
    """``"ok: <device>"`` or why PyTorch cannot be used here."""
    try:
        import torch
    except ImportError:
        return "unavailable: torch is not installed (pip install omnimri-node[train])"
    dev = "cuda:0 " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"ok: torch {torch.__version__} on {dev}"


class TorchEngine(NamedIO):
    """A TorchScript or eager module behind the :class:`~inference.engines.Engine` Protocol.

    Args:
        module: A ``torch.nn.Module`` (eager) or ``torch.jit.ScriptModule``; taking the inputs
            positionally in ``input_names`` order and returning a tensor, a tuple/list of
            tensors (in ``output_names`` order) or a dict keyed by output name.
        input_names: Input tensor names.
        output_names: Output tensor names.
        device: ``"cpu"``, ``"cuda"``; default CUDA when available.
        intra_op_threads: ``torch.set_num_threads`` (process-wide!), 0 = leave as is.
    """

    name = "torch"

    def __init__(
        self,
        module: Any,
        input_names: Sequence[str],
        output_names: Sequence[str],
        *,
        device: str | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        try:
            import torch
        except ImportError:
            raise EngineUnavailable("torch is not installed") from None
        self._torch = torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineUnavailable("CUDA requested but torch sees no CUDA device")
        if intra_op_threads > 0:
            torch.set_num_threads(intra_op_threads)
        self._device = torch.device(device)
        self._module = module.to(self._device).eval()
        self._inputs = list(input_names)
        self._outputs = list(output_names)
        self.provider = str(self._device)

    @classmethod
    def for_package(
        cls, package: ModelPackage, *, version: int | None = None, intra_op_threads: int = 0,
        device: str | None = None,
    ) -> TorchEngine:
        """Load ``<version>/model.pt`` (TorchScript) of a package.

        Raises:
            EngineUnavailable: torch missing, or the package carries no TorchScript file.
        """
        path = package.torchscript_path(version)
        if not path.is_file():
            raise EngineUnavailable(f"package {package.name!r} has no TorchScript {path.name}")
        try:
            import torch
        except ImportError:
            raise EngineUnavailable("torch is not installed") from None
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as err:
            raise EngineUnavailable(f"cannot load {path.name}: {err}") from None
        return cls(
            module, [package.spec.input.name], package.spec.engine_outputs(),
            device=device, intra_op_threads=intra_op_threads,
        )


    def run(self, inputs: Tensors, outputs: Sequence[str] | None = None) -> Tensors:
        """Run the module under ``torch.inference_mode``; outputs back as numpy (float32).

        ``outputs`` is checked against the module's names and otherwise ignored: the module
        computes (and this returns) every output.
        """
        check_outputs(outputs, self._outputs)
        torch = self._torch
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self._device)
                for n in self._inputs]
        with torch.inference_mode():
            result = self._module(*args)
        if isinstance(result, dict):
            items = [result[n] for n in self._outputs]
        elif isinstance(result, list | tuple):
            items = list(result)
        else:
            items = [result]
        if len(items) != len(self._outputs):
            raise ValueError(
                f"module returned {len(items)} outputs; the package declares {self._outputs}"
            )
        out: Tensors = {}
        for name, t in zip(self._outputs, items, strict=True):
            arr = t.detach().to("cpu").numpy()
            out[name] = arr.astype(np.float32) if arr.dtype == np.float16 else arr
        return out

    def close(self) -> None:
        """Drop the module and free cached CUDA memory."""
        self._module = None
        if self._device.type == "cuda":
            self._torch.cuda.empty_cache()
