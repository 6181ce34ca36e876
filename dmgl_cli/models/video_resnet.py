"""torchvision's 3D ResNets (``r3d_18``, ``mc3_18``, ``r2plus1d_18``) at any width and any number of input channels,
for :func:`dmgl_cli.models.vision.build_video_resnet`. Apart from ``vision.py`` because the class subclasses
torchvision's ``VideoResNet``: importing torchvision (and the torch._dynamo it loads, ~1.5-3 s) waits until a 3D
ResNet is built."""

from __future__ import annotations

from torch import nn
from torchvision.models.video import resnet as tv_video

VIDEO_ARCHS = {
    "r3d_18": (tv_video.BasicBlock, [tv_video.Conv3DSimple] * 4, [2, 2, 2, 2]),
    "mc3_18": (tv_video.BasicBlock, [tv_video.Conv3DSimple] + [tv_video.Conv3DNoTemporal] * 3, [2, 2, 2, 2]),
    "r2plus1d_18": (tv_video.BasicBlock, [tv_video.Conv2Plus1D] * 4, [2, 2, 2, 2]),
}


class ScaledVideoResNet(tv_video.VideoResNet):
    """torchvision's VideoResNet with every layer's width scaled by ``width / 64`` and a C-channel stem."""

    def __init__(self, arch: str, in_channels: int, width: int):
        self._scale_width = width
        block, conv_makers, layers = VIDEO_ARCHS[arch]
        stem = tv_video.R2Plus1dStem if arch == "r2plus1d_18" else tv_video.BasicStem
        super().__init__(block, conv_makers, layers, stem)
        self.stem = self._stem(arch, in_channels, width)
        self.fc = nn.Identity()
        self.out_features = width * 8 * block.expansion

    def _make_layer(self, block, conv_builder, planes, blocks, stride=1):
        if planes == 64:  # layer1: the stem's output width
            self.inplanes = self._scale_width
        return super()._make_layer(block, conv_builder, planes * self._scale_width // 64, blocks, stride)

    @staticmethod
    def _stem(arch: str, channels: int, width: int) -> nn.Sequential:
        if arch == "r2plus1d_18":
            mid = max(1, width * 45 // 64)
            return nn.Sequential(
                nn.Conv3d(channels, mid, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
                nn.BatchNorm3d(mid),
                nn.ReLU(inplace=True),
                nn.Conv3d(mid, width, (3, 1, 1), (1, 1, 1), (1, 0, 0), bias=False),
                nn.BatchNorm3d(width),
                nn.ReLU(inplace=True),
            )
        return nn.Sequential(
            nn.Conv3d(channels, width, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )
