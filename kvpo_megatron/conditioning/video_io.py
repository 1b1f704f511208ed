"""Write decoded frames to an mp4 with PyAV (H.264, yuv420p)."""
from __future__ import annotations

from pathlib import Path

import torch


def write_mp4(frames: torch.Tensor, path: str | Path, *, fps: int = 16) -> Path:
    """frames: [T, 3, H, W] in [0, 1] (or uint8). Odd sizes are padded to even (H.264 needs even sizes)."""
    import av

    x = frames.detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    t, _, h, w = x.shape
    x = torch.nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="replicate") if (h % 2 or w % 2) else x
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = x.shape[3], x.shape[2], "yuv420p"
        for frame in x.permute(0, 2, 3, 1).numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
