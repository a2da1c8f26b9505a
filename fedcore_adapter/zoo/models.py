"""Small built-in models: a 1D CNN for MNIST-1D and a 2D CNN for digits."""
from __future__ import annotations

from torch import nn


def _conv1d_block(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv1d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm1d(cout),
            nn.ReLU()]


class MNIST1DCNN(nn.Module):
    """1D CNN for MNIST-1D (``[N, 1, 40]`` -> 10 logits): four conv blocks, then a linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 32, length: int = 40):
        super().__init__()
        self.features = nn.Sequential(
            *_conv1d_block(1, width, 5),
            *_conv1d_block(width, width * 2, 5, stride=2),
            *_conv1d_block(width * 2, width * 2, 3),
            *_conv1d_block(width * 2, width * 4, 3, stride=2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 4 * (length // 4), 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class DigitsCNN(nn.Module):
    """2D CNN for the 8x8 digits (``[N, 1, 8, 8]`` -> 10 logits)."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width * 2, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(width * 2), nn.ReLU(),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(width * 2 * 16, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
