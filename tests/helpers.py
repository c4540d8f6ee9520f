"""Shared by the tests: reading a sample grid back, and a cheap stand-in feature network."""

import numpy as np
import torch
from PIL import Image

from msf.evaluation.metrics import FeatureExtractor, WeightsFile
from msf.interfaces.viz import labelled_grid

# seconds: a subprocess's guard against a hang, not a speed limit (a slow CPU kind must never reach it;
# the slowest subprocess test takes about 70 s on an AVX2-only CPU); CI's own limit is 90 minutes
HANG = 1800


class MeanColour(FeatureExtractor):
    """A cheap stand-in network: features and logits are the mean colour; counts the images it sees."""

    network = "mean colour (test)"
    has_logits = True

    def __init__(self, sha256: str = "a" * 64):
        super().__init__(torch.nn.Identity(), WeightsFile("<none>", sha256), "cpu")
        self.images_seen = 0

    def _forward(self, x):
        self.images_seen += len(x)
        f = x.float().mean(dim=(2, 3))
        return f, f


def grid_cells(path, rows: int, cols: int, size: int, upscale: int = 2, pad: int = 2,
               label_width: int = 150) -> np.ndarray:
    """uint8 (rows, cols, size, size, 3): the cell images of a grid PNG, at their own resolution."""
    img = np.asarray(Image.open(path).convert("RGB"))
    grid_w = (cols * (size + pad) + pad) * upscale
    grid_h = (rows * (size + pad) + pad) * upscale
    # a caption may lie under the grid (and widen the image): the cells are at the top left
    assert img.shape[0] >= grid_h and img.shape[1] >= label_width + grid_w, (img.shape, rows, cols, size)
    canvas = img[:grid_h, label_width:label_width + grid_w][::upscale, ::upscale]
    out = np.empty((rows, cols, size, size, 3), np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (size + pad), pad + c * (size + pad)
            out[r, c] = canvas[y:y + size, x:x + size]
    return out


assert labelled_grid.__defaults__ == (2, 150), "grid_cells assumes labelled_grid's layout"


def kill_after_checkpoint(cmd: list[str], checkpoints, step: int, timeout: float = 120.0) -> None:
    """Start ``cmd``, SIGKILL it once ``checkpoints`` holds one of step ``step`` or later, and check that
    it was killed rather than finished."""
    import signal
    import subprocess
    import time

    from msf.training.checkpoint import list_checkpoints

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        done = list_checkpoints(checkpoints)
        if done and done[-1][0] >= step:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def measured_flops(net, n: int, channels: int = 3) -> int:
    """FLOPs of one forward of a scale's network on an ``n`` x ``n`` input, as torch's flop counter sees
    them (the math attention backend decomposes attention into matmuls it counts)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, channels, n, n)
    prior = torch.randn(1, channels, n, n) if net.prior_channels else None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        net(x, torch.rand(1), torch.tensor([0]), prior)
    return counter.get_total_flops()
