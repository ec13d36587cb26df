"""How a fine-tune becomes its 1-bit delta, as a tenant asks at upload or in a re-compression (no torch: the API
layer builds one)."""

from __future__ import annotations

from dataclasses import dataclass

HELD_OUT_SHARE = 0.2  # of a recipe's calibration text: measures fidelity; the rest distils the scales


@dataclass(frozen=True)
class Recipe:
    """How a fine-tune becomes its 1-bit delta: scales per matrix or per row, scale-distillation steps, and the
    tenant's calibration text. With text, its last HELD_OUT_SHARE (cut at a space) is held out to measure the
    version's fidelity, and the rest distils the scales (when distill_steps > 0)."""

    scale: str = "per-matrix"
    distill_steps: int = 0
    calibration_text: str | None = None

    def split(self) -> tuple[str | None, str | None]:
        """(text for distillation, held-out text), None where there is none."""
        text = self.calibration_text
        if not text:
            return None, None
        cut = text.rfind(" ", 0, int(len(text) * (1 - HELD_OUT_SHARE)) + 1)
        cut = cut if cut > 0 else int(len(text) * (1 - HELD_OUT_SHARE))
        return text[:cut], text[cut:]
