"""Episode videos: camera frames enlarged for viewing, with the instruction written in a strip below each frame."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import imageio.v2 as imageio
import numpy as np

MIN_WIDTH = 320  # small camera frames are enlarged (nearest neighbour, integer factor) to at least this width
FONT, FONT_SCALE, THICKNESS, MARGIN = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1, 6


def caption_strip(text: str, width: int) -> np.ndarray:
    """uint8 [h, width, 3]: `text` in white on black, wrapped to the width; h is even (H.264 wants even sizes)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and cv2.getTextSize(candidate, FONT, FONT_SCALE, THICKNESS)[0][0] <= width - 2 * MARGIN:
            lines[-1] = candidate
        else:
            lines.append(word)
    (_, text_height), baseline = cv2.getTextSize("Ag", FONT, FONT_SCALE, THICKNESS)
    line_height = text_height + baseline + 4
    height = 2 * MARGIN + max(1, len(lines)) * line_height
    strip = np.zeros((height + height % 2, width, 3), np.uint8)
    for i, line in enumerate(lines):
        origin = (MARGIN, MARGIN + i * line_height + text_height)
        cv2.putText(strip, line, origin, FONT, FONT_SCALE, (255, 255, 255), THICKNESS, cv2.LINE_AA)
    return strip


def captioned_frame(image: np.ndarray, strip: np.ndarray) -> np.ndarray:
    """image uint8 [H, W, 3] enlarged to the strip's width, with the strip below it."""
    factor = strip.shape[1] // image.shape[1]
    large = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
    return np.concatenate([large, strip], axis=0)


class EpisodeVideo:
    """An MP4 (H.264 via imageio's ffmpeg plugin) of one episode's camera frames with `prompt` written below them.

    `append(image)` encodes one uint8 [H, W, 3] frame (H and W even); `close()` finishes the file."""

    def __init__(self, path: Path, prompt: str, fps: float) -> None:
        self.path = Path(path)
        self.prompt, self.fps = prompt, fps
        self._strip: np.ndarray | None = None
        self._writer = None

    def append(self, image: np.ndarray) -> None:
        if self._writer is None:
            if image.shape[0] % 2 or image.shape[1] % 2:
                raise ValueError(f"video frames need even sizes (H.264), got {list(image.shape[:2])}")
            factor = max(1, math.ceil(MIN_WIDTH / image.shape[1]))
            self._strip = caption_strip(self.prompt, image.shape[1] * factor)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = imageio.get_writer(
                self.path, format="FFMPEG", mode="I", fps=self.fps, codec="libx264", macro_block_size=1
            )
        self._writer.append_data(captioned_frame(image, self._strip))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
