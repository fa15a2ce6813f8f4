"""Kernel modes: how ONNX Runtime runs blockwise (MatMulNBits) weights of each bit width.

Two choices change the speed, and possibly the outputs, of the same compression:

* ``accuracy_level``: 0 runs the products with fp32 activations; 4 quantizes the activations to
  int8 per block of the input and takes the int8 kernels. Which is faster depends on the CPU (with
  or without AVX-512 VNNI or AVX-VNNI), the batch shape (batch-1 decoding or 8x128 encoder
  batches) and the bit width (8-bit weights have only an int8 kernel), and level 4 can move the
  outputs of models with outlier activations;
* ``symmetric`` codes: no zero points (round-to-nearest only), one tensor less to read per block.

So they are measured per hardware target and model (``slimtune.evaluators.kernel_modes``), not
fixed: ``EXACT`` (level 0, zero points) is the slowest-but-exact reference they are held against.
A trial records the modes it was built with, and a rebuild reads them back: the same plan with
the same modes gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelModes:
    """Per bit width: ``levels`` (bits, accuracy level) and the bit widths stored ``symmetric``.
    Bit widths not listed run at level 0 with zero points."""

    levels: tuple[tuple[int, int], ...] = ()
    symmetric: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(sorted((int(b), int(v)) for b, v in self.levels if int(v) != 0)))
        object.__setattr__(self, "symmetric", tuple(sorted({int(b) for b in self.symmetric})))
        if any(level not in (0, 1, 2, 3, 4) for _, level in self.levels):
            raise ValueError(f"MatMulNBits accuracy levels are 0 to 4, not {self.levels}")

    def level(self, bits: int) -> int:
        return dict(self.levels).get(bits, 0)

    def is_symmetric(self, bits: int) -> bool:
        return bits in self.symmetric

    def dumps(self) -> str:
        return json.dumps({"levels": {str(b): v for b, v in self.levels}, "symmetric": list(self.symmetric)},
                          sort_keys=True)

    @classmethod
    def loads(cls, text: str | None) -> KernelModes:
        """The modes a trial recorded; an empty text (a search from before modes were measured) is ``EXACT``."""
        if not text:
            return EXACT
        data = json.loads(text)
        return cls(levels=tuple((int(b), int(v)) for b, v in data.get("levels", {}).items()),
                   symmetric=tuple(int(b) for b in data.get("symmetric", ())))

    def describe(self) -> str:
        parts = [f"{b}-bit level {self.level(b)}{' symmetric' if self.is_symmetric(b) else ''}"
                 for b in sorted({b for b, _ in self.levels} | set(self.symmetric))]
        return ", ".join(parts) or "level 0 with zero points (exact)"


EXACT = KernelModes()
