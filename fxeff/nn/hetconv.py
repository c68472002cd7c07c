"""HetConv2d (Singh et al. CVPR'19, REFERENCE.md section 3): a KxK conv where each filter keeps its KxK taps on
one block of M/P input channels and only the centre tap (a 1x1 kernel) on the others.

Filter j's block is g = floor(j * P / N) (contiguous blocks; the paper's strided pattern is a channel
permutation of this). The weights are stored compactly (``weight_kxk`` [N, M/P, K, K] and ``weight_1x1``
[N, M - M/P]): structurally absent taps have no storage and no gradient. ``dense_weight()`` is the
equivalent masked [N, M, K, K] kernel, for checks and export to plain convs.
"""
import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._utils import pair
from ..ops.hetconv2d import block_columns
from ._notrace import register_notrace_module

INITS = ("centre", "sum", "fit")
FIT_RIDGE = 1e-3  # init="fit": the least-squares fit's pull towards the "sum" weights, relative to the mean input energy
FIT_CHUNK_ELEMENTS = 1 << 23  # init="fit": unfolded float64 columns held at a time (64 MiB)


def own_block_mask(out_channels: int, in_channels: int, part: int) -> torch.Tensor:
    """bool [N, M]: True where input channel c lies in filter j's KxK block g = floor(j * P / N)."""
    own, _ = block_columns(out_channels, in_channels, part, "cpu")
    return torch.zeros(out_channels, in_channels, dtype=torch.bool).scatter(1, own, True)


def _check_sizes(where: str, in_channels: int, out_channels: int, kernel_size: Tuple[int, int], part: int) -> None:
    if isinstance(part, bool) or not isinstance(part, int) or part < 1:
        raise ValueError(f"{where}: part must be an int >= 1, got {part!r}")
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if value < 1 or value % part:
            raise ValueError(f"{where}: {name} must be a positive multiple of part={part}, got {value}")
    if kernel_size[0] != kernel_size[1] or kernel_size[0] % 2 == 0:
        raise ValueError(f"{where}: kernel_size must be square and odd (1, 3, 5, 7, ...), got {kernel_size}")


@register_notrace_module
class HetConv2d(nn.Module):
    """Drop-in for ``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)``
    computed by ``fxeff.ops.hetconv2d`` with 1/P + (1 - 1/P)/K^2 of its MACs."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int]], part: int,
                 stride: Union[int, Tuple[int, int]] = 1, padding: Union[int, Tuple[int, int]] = 0,
                 dilation: Union[int, Tuple[int, int]] = 1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        where = "fxeff.nn.HetConv2d"
        kernel = tuple(pair("kernel_size", "nn.HetConv2d", kernel_size))
        _check_sizes(where, in_channels, out_channels, kernel, part)
        self.in_channels, self.out_channels, self.part = in_channels, out_channels, part
        self.kernel_size = kernel
        self.stride = tuple(pair("stride", "nn.HetConv2d", stride))
        self.padding = tuple(pair("padding", "nn.HetConv2d", padding))
        self.dilation = tuple(pair("dilation", "nn.HetConv2d", dilation))
        factory = {"device": device, "dtype": dtype}
        block = in_channels // part
        self.weight_kxk = nn.Parameter(torch.empty(out_channels, block, *kernel, **factory))
        self.weight_1x1 = nn.Parameter(torch.empty(out_channels, in_channels - block, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Conv2d's default init (kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the
        weights and the bias) with fan_in the taps a filter really has."""
        bound = 1.0 / math.sqrt(self.fan_in)
        for p in (self.weight_kxk, self.weight_1x1) + ((self.bias,) if self.bias is not None else ()):
            nn.init.uniform_(p, -bound, bound)

    @property
    def fan_in(self) -> int:
        return self.weight_kxk[0].numel() + self.weight_1x1.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.hetconv2d(x, self.weight_kxk, self.weight_1x1, self.bias, self.part, self.stride, self.padding,
                             self.dilation)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense kernel [N, M, K, K] (zeros at the structurally absent taps)."""
        return ops.hetconv_dense_weight(self.weight_kxk, self.weight_1x1, self.part)

    def mac_ratio(self) -> float:
        """MACs of this layer / MACs of the dense KxK conv: 1/P + (1 - 1/P)/K^2."""
        k2 = self.kernel_size[0] * self.kernel_size[1]
        return self.fan_in / (self.in_channels * k2)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, part: int, init: str = "sum",
                  inputs: Optional[torch.Tensor] = None) -> "HetConv2d":
        """A HetConv2d approximating ``conv`` (new parameters; the conv is not changed).

        Each filter keeps the conv's KxK taps on its own block; on the other channels its single tap is
        the conv's centre tap (``init="centre"``) or the sum of the conv's taps (``init="sum"``: exact for
        inputs constant over the window, the better one on real images, see docs/benchmarks.md).
        ``init="fit"`` solves for all the weights that minimise the output error on ``inputs`` (the conv's
        input on representative data, [B, M, H, W]), see ``fit_weights``.
        """
        where = "fxeff.nn.HetConv2d.from_conv"
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{where}: conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"{where}: conv.groups must be 1 (a standard conv), got {conv.groups}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{where}: conv.padding_mode must be 'zeros', got {conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ValueError(f"{where}: conv.padding must be ints, got {conv.padding!r}")
        if init not in INITS:
            raise ValueError(f"{where}: init must be one of {INITS}, got {init!r}")
        return cls.from_weight(conv.weight, conv.bias, part, conv.stride, conv.padding, conv.dilation, init, inputs)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias, part: int, stride=1, padding=0, dilation=1,
                    init: str = "sum", inputs: Optional[torch.Tensor] = None,
                    reference_inputs: Optional[torch.Tensor] = None) -> "HetConv2d":
        """A HetConv2d approximating the conv with dense ``weight`` [N, M, K, K] and ``bias`` (see from_conv;
        ``inputs``, ``reference_inputs``: see fit_weights); new parameters, the tensors are copied."""
        n, m, kh, kw = weight.shape
        # no random init: every parameter is written below
        module = torch.nn.utils.skip_init(cls, m, n, (kh, kw), part, stride, padding, dilation, bias is not None,
                                          device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            if init == "fit":
                if inputs is None:
                    raise ValueError("fxeff.nn.HetConv2d: init='fit' fits the weights to the conv's input on "
                                     "representative data and expected inputs=[B, M, H, W], got None")
                weight_kxk, weight_1x1 = fit_weights(weight.detach(), part, inputs, module.stride, module.padding,
                                                     module.dilation, reference_inputs=reference_inputs)
            else:
                weight_kxk, weight_1x1 = compact_weights(weight.detach(), part, init)
            module.weight_kxk.copy_(weight_kxk)
            module.weight_1x1.copy_(weight_1x1)
            if bias is not None:
                module.bias.copy_(bias.detach())
        return module

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, part={self.part}, "
                f"stride={self.stride}")
        if any(self.padding):
            text += f", padding={self.padding}"
        if any(d != 1 for d in self.dilation):
            text += f", dilation={self.dilation}"
        return text + f", bias={self.bias is not None}"


def compact_weights(weight: torch.Tensor, part: int, init: str = "sum") -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight_kxk [N, M/P, K, K], weight_1x1 [N, M - M/P]) approximating a dense [N, M, K, K] kernel: each
    filter's KxK taps on its own block; on the other channels the centre tap ("centre") or the taps' sum ("sum")."""
    if init not in ("centre", "sum"):
        raise ValueError(f"fxeff.nn.hetconv.compact_weights: init must be 'centre' or 'sum' ('fit' needs inputs: "
                         f"fit_weights), got {init!r}")
    n, m, kh, kw = weight.shape
    own, other = block_columns(n, m, part, weight.device)
    single = weight[:, :, kh // 2, kw // 2] if init == "centre" else weight.sum((2, 3))
    return weight.gather(1, own[:, :, None, None].expand(n, m // part, kh, kw)), single.gather(1, other)


def fit_weights(weight: torch.Tensor, part: int, inputs: torch.Tensor, stride=1, padding=0, dilation=1,
                ridge: float = FIT_RIDGE, reference_inputs: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(weight_kxk, weight_1x1) minimising ||hetconv(inputs) - conv(reference_inputs, weight)||^2 + penalty:
    a linear least-squares fit per block of filters (the filters of one block see the same taps), solved
    in float64 from Gram matrices accumulated over chunks of ``inputs`` ([B, M, H, W]).

    The output-reconstruction init of channel pruning (He et al., ICCV'17) for HetConv's structure: the
    KxK taps of the own block and the single taps of the other channels are chosen together to explain
    the whole dense conv on this data. ``reference_inputs`` (default ``inputs``) is what the dense conv
    saw in the original network; ``inputs`` what the HetConv sees once the layers before it are rewritten,
    so the fit also corrects their error. ``ridge`` * (mean input energy per feature) * ||w - w_sum||^2
    pulls the solution towards the "sum" weights, so taps the data does not determine stay at that init.
    """
    n, m, k, k2 = weight.shape
    reference_inputs = inputs if reference_inputs is None else reference_inputs
    for name, t in (("inputs", inputs), ("reference_inputs", reference_inputs)):
        if t.dim() != 4 or t.shape[1] != m:
            raise ValueError(f"fxeff.nn.hetconv.fit_weights: {name} expected [B, {m}, H, W], got {list(t.shape)}")
    if reference_inputs.shape != inputs.shape:
        raise ValueError(f"fxeff.nn.hetconv.fit_weights: reference_inputs expected the shape of inputs "
                         f"{list(inputs.shape)}, got {list(reference_inputs.shape)}")
    if not ridge > 0:
        raise ValueError(f"fxeff.nn.hetconv.fit_weights: ridge expected a number > 0, got {ridge!r}")
    stride, padding, dilation = (tuple(pair(name, "fit_weights", v)) for name, v in
                                 (("stride", stride), ("padding", padding), ("dilation", dilation)))
    mb, nb, taps = m // part, n // part, k * k2
    features = mb * taps + m - mb
    centre = (k // 2) * k2 + k2 // 2
    dense = weight.detach().to(torch.float64).reshape(n, m * taps)
    gram = torch.zeros(part, features, features, dtype=torch.float64, device=weight.device)
    cross = torch.zeros(part, features, nb, dtype=torch.float64, device=weight.device)
    per_image = m * taps * max(1, (inputs.shape[2] * inputs.shape[3]) // (stride[0] * stride[1]))
    chunk = max(1, FIT_CHUNK_ELEMENTS // per_image)

    def columns(x: torch.Tensor) -> torch.Tensor:  # [M, K*K, samples]
        cols = F.unfold(x.to(weight.device, torch.float64), (k, k2), dilation, padding, stride)
        return cols.transpose(0, 1).reshape(m, taps, -1)

    for x, x_ref in zip(inputs.detach().split(chunk), reference_inputs.detach().split(chunk)):
        cols = columns(x)
        ref = cols if x_ref is x else columns(x_ref)
        target = dense @ ref.reshape(m * taps, -1)  # [N, samples]: the dense conv without bias
        for g in range(part):
            other = torch.cat([cols[:g * mb, centre], cols[(g + 1) * mb:, centre]])
            a = torch.cat([cols[g * mb:(g + 1) * mb].reshape(mb * taps, -1), other])
            gram[g] += a @ a.T
            cross[g] += a @ target[g * nb:(g + 1) * nb].T
    start_kxk, start_1x1 = compact_weights(weight.detach().to(torch.float64), part, "sum")
    start = torch.cat([start_kxk.reshape(n, mb * taps), start_1x1], 1).reshape(part, nb, features).transpose(1, 2)
    scale = ridge * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)[:, None, None]
    eye = torch.eye(features, dtype=torch.float64, device=weight.device)
    # SPD normal equations: Cholesky (batched float64 linalg.solve fails in MKL's LU with > 1 thread, torch 2.14)
    solved = torch.cholesky_solve(cross + scale * start, torch.linalg.cholesky(gram + scale * eye))
    solved = solved.transpose(1, 2).reshape(n, features).to(weight.dtype)
    return solved[:, :mb * taps].reshape(n, mb, k, k2).contiguous(), solved[:, mb * taps:].contiguous()
