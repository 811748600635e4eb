"""A small conv encoder trained from scratch whose output is K image keypoints (a spatial soft-argmax).

Behaviour cloning from a ViT's 16 px patches has to learn *where* a small object is through position
embeddings and attention, and with tens of demos per task it does not: our MT10 teachers read the goal
from where the hand is, not from the 9 px goal marker. A spatial soft-argmax (Levine et al. 2016; the
default image encoder of robomimic) makes location the output: each of K learned feature maps is turned
into a probability over pixels and reduced to its expected (x, y). A channel that fires on the goal
marker then gives the goal's image coordinates directly, to sub-cell precision. (On MT10, in 3,000
steps from scratch, none did: docs/BENCHMARKS.md, issue 22.)

Each keypoint becomes one image token of the reference VLA (its coordinates through a small MLP, plus
a learned embedding of which keypoint it is), so the routed backbone is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (stride) of each 3x3 convolution; channels are the encoder's width throughout. Output stride 4: a
# 32 x 32 map at 128 px, so one cell is 4 px and a 9 px marker covers a few of them.
CONV_STRIDES = (2, 2, 1, 1)


class SpatialKeypointEncoder(nn.Module):
    """Pixels (N, 3, S, S), normalised to [-1, 1] -> (N, K, 2) keypoint coordinates in [-1, 1] (x, y)."""

    def __init__(self, num_keypoints: int, channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        inp = 3
        for stride in CONV_STRIDES:
            layers += [nn.Conv2d(inp, channels, 3, stride, 1), nn.ReLU(inplace=True)]
            inp = channels
        self.convs = nn.Sequential(*layers)
        self.to_keypoints = nn.Conv2d(channels, num_keypoints, 1)
        # Softmax temperature per keypoint, learned (log scale): sharp maps give precise coordinates.
        self.log_temperature = nn.Parameter(torch.zeros(num_keypoints))
        self.num_keypoints = num_keypoints
        self.channels = channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He initialisation: the ReLU stack keeps its activations' scale, so the keypoint maps are not
        flat (a flat map's soft-argmax is the image centre, whatever the image) at the first step."""
        for conv in (*self.convs[::2], self.to_keypoints):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    @staticmethod
    def output_size(image_size: int) -> int:
        size = image_size
        for stride in CONV_STRIDES:
            size = (size + 2 - 3) // stride + 1
        return size

    def forward(self, pixels: Tensor) -> Tensor:
        return self.soft_argmax(self.to_keypoints(self.convs(pixels)))

    def soft_argmax(self, maps: Tensor) -> Tensor:
        """(N, K, h, w) keypoint maps -> (N, K, 2): each map's expected (x, y) under its softmax, with
        the cell centres spread evenly over [-1, 1] (x left to right, y top to bottom)."""
        n, k, h, w = maps.shape
        logits = maps.flatten(2) / self.log_temperature.exp().view(1, k, 1)
        attention = F.softmax(logits.float(), dim=-1).to(maps.dtype)  # (N, K, h * w)
        ys = torch.linspace(-1.0, 1.0, h, device=maps.device, dtype=maps.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=maps.device, dtype=maps.dtype)
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).view(h * w, 2)  # (x, y) per cell
        return attention @ grid

    def flops(self, image_size: int) -> float:
        """Convolution FLOPs of one image (multiply-add = 2 FLOPs), the soft-argmax included."""
        total, size, inp = 0.0, image_size, 3
        for stride in CONV_STRIDES:
            size = (size + 2 - 3) // stride + 1
            total += 2 * size * size * self.channels * inp * 9
            inp = self.channels
        total += 2 * size * size * self.num_keypoints * (self.channels + 2)  # 1x1 maps and the expectation
        return float(total)
