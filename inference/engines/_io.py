"""What every engine shares: the names of its graph inputs and outputs."""

from __future__ import annotations

from collections.abc import Collection, Sequence


def check_outputs(outputs: Sequence[str] | None, known: Collection[str]) -> None:
    """Raise ``KeyError`` when ``outputs`` names an output not in ``known`` (``None``: all)."""
    if outputs is None:
        return
    unknown = sorted(set(outputs).difference(known))
    if unknown:
        raise KeyError(f"unknown outputs {unknown}; the graph returns {list(known)}")


class NamedIO:
    """Mixin: ``input_names`` / ``output_names`` from ``_inputs`` and ``_outputs``."""

    _inputs: Collection[str]
    _outputs: Collection[str]

    @property
    def input_names(self) -> list[str]:
        """Graph input names, in the order the engine feeds them."""
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        """Graph output names, in the order the engine returns them."""
        return list(self._outputs)
