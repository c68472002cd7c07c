"""A tiny CNN and inputs whose AoI is known, shared by the backend and deployment tests.

The stem's conv has non-negative weights and no bias, so the split activation (``stem``'s ReLU
output) is zero on a black background and positive around a bright square: with THRESHOLD the
AoI is the square (grown by the stem's receptive field), wherever the square is placed.
"""
import torch
from torch import nn

SPLIT = "stem"
THRESHOLD = 0.5
SIZE = 32


class TinyFocusNet(nn.Module):
    """stem (split) -> conv/BN/ReLU -> stride-2 residual block with a 1x1 shortcut -> 1x1 head (a map)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.shortcut = nn.Conv2d(16, 16, 1, stride=2)
        self.head = nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.stem[0].weight.abs_()
            self.bn1.running_mean.uniform_(-0.2, 0.2)
            self.bn1.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.conv2(x))
        y = self.conv3(y) + self.shortcut(x)
        return self.head(torch.relu(y))


def make_model() -> TinyFocusNet:
    torch.manual_seed(0)
    return TinyFocusNet().eval()


def bright_square(corner, side: int = 10, batch: int = 1) -> torch.Tensor:
    """[batch, 3, SIZE, SIZE]: black, with a bright textured square of ``side`` px at ``corner`` (row, col)."""
    generator = torch.Generator().manual_seed(corner[0] * 100 + corner[1])
    x = torch.zeros(batch, 3, SIZE, SIZE)
    r, c = corner
    x[:, :, r:r + side, c:c + side] = 0.5 + torch.rand(batch, 3, side, side, generator=generator)
    return x


# two inputs whose AoIs do not overlap: a model with a mask frozen at trace time fails on the second
INPUT_A_CORNER = (2, 3)
INPUT_B_CORNER = (18, 19)


def focus_config():
    import fxeff
    return fxeff.Focus(threshold=THRESHOLD, split=SPLIT, execution="layer")


def region_focus_config():
    """Region execution with every grid on 4x4 tiles (the cost model would run this tiny model dense)."""
    import fxeff
    return fxeff.Focus(threshold=THRESHOLD, split=SPLIT, execution="region", tile=4, dense_above=None)


CONFIGS = {"layer": focus_config, "region": region_focus_config}
