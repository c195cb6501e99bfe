"""``FastDenseNet`` and the ``densenet121/161/169/201/264`` constructors.

Module names, parameter names and state_dict order are torchvision's, so torchvision checkpoints load
strictly into these models and theirs into torchvision's. Pretrained weights load through torchvision
(``weights=DenseNet121_Weights.IMAGENET1K_V1`` ...), including its legacy-key remap.
"""

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import densenet as tv_densenet
from torchvision.models._utils import _ovewrite_named_param, handle_legacy_interface

from .backend import check_backend_name, resolve_backend
from .batchnorm import KnownStats
from .block import CONVS, FastDenseBlock
from .bn_relu_pool import (
    AVERAGE_POOLS,
    PART_NAMES,
    POOLS,
    bn_relu_pool,
    check_pool_window,
    fusable,
    fused_transition,
    global_average_pool,
    kernel_window,
    norm_dims,
    recomputable,
    triton_bn_relu_pool_into,
)
from .layout import channels_last
from .observed import hooked, watched
from .tracing import call_module_node, is_traced, jit_compiling
from .validation import check_stem_input, check_transition_input, compute_dtype, records_grad


class Transition(nn.Sequential):
    """BN-ReLU-1x1 conv-2x2 average pool, torchvision's ``_Transition`` with the same names.

    The pool runs before the conv: both are linear and the conv has no bias, so the result is the
    same while the GEMM sees 4x fewer rows and backward keeps a 4x smaller conv input. With the Triton
    backend and no gradient to record, BN-ReLU-pool-conv is one kernel (the GEMM's prologue averages
    each 2x2 window); with gradients, the BN-ReLU-pool kernel feeds PyTorch's conv.
    """

    def __init__(self, num_input_features: int, num_output_features: int, *, backend: str = "auto") -> None:
        super().__init__()
        self.backend = check_backend_name(backend)
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    @classmethod
    def of_modules(cls, modules: OrderedDict[str, nn.Module], *, backend: str = "auto") -> "Transition":
        """A transition holding the given ``norm``, ``relu``, ``conv`` and ``pool`` modules themselves (any
        number of spatial dimensions: MONAI's 3-D transitions convert to one; no ``relu`` where ``norm`` is timm's
        ``BatchNormAct2d``, which applies it)."""
        transition = cls.__new__(cls)
        nn.Sequential.__init__(transition, modules)
        transition.backend = check_backend_name(backend)
        return transition

    def exact(self) -> bool:
        """Whether the fused path computes exactly ``pool(conv(relu(norm(x))))`` with these modules."""
        return fusable(self.norm, self._modules.get("relu"), self.pool) and self._pool_first_is_exact()

    def fuses_into_next_block(self) -> bool:
        """Whether inference can run this transition as one kernel writing into the next block's buffer."""
        return self.exact() and not hooked(self.conv) and kernel_window(self.pool) == ((2, 2), 2, 0, False)

    def _pool_first_is_exact(self) -> bool:
        """Average pooling and a bias-free 1x1 convolution commute (both linear, the pool acts on every
        channel alike): pooling first is exact."""
        conv, dims = self.conv, norm_dims(self.norm)
        if type(conv) is not CONVS.get(dims) or POOLS.get(type(self.pool)) != dims:
            return False
        plain_conv = set(conv.kernel_size) == {1} and set(conv.stride) == {1} and set(conv.padding) == {0}
        plain_conv = plain_conv and set(conv.dilation) == {1} and conv.groups == 1 and conv.padding_mode == "zeros"
        return isinstance(self.pool, AVERAGE_POOLS) and plain_conv and conv.bias is None

    def forward(self, x: Tensor) -> Tensor:
        if jit_compiling():  # TorchScript, torch.jit.trace
            return self.reference(x)
        return self._fused_forward(x)

    def reference(self, x: Tensor) -> Tensor:
        """The modules one after the other, as torchvision's (and timm's and MONAI's) transition runs them."""
        for module in self:
            x = module(x)
        return x

    @torch.jit.unused
    def _fused_forward(self, x):  # not annotated: TorchScript reads an unused method's real annotations
        if is_traced(x):  # FX: one call_module node
            return call_module_node(self, x)
        if not self.exact() or watched(self):  # a hook on the conv must see torchvision's (unpooled) input
            return self.reference(x)
        check_transition_input(x, self.norm, norm_dims(self.norm), PART_NAMES["transition"])
        check_pool_window(x, self.pool, PART_NAMES["transition"])
        backend = resolve_backend(self.backend, x.device)
        needs_grad = records_grad(x, self)
        if backend == "triton" and not needs_grad and self.fuses_into_next_block():
            return fused_transition(x, self.norm, self.conv.weight, compute_dtype(x))
        return self.conv(bn_relu_pool(x, self.norm, self.pool, backend, part="transition"))


def recomputes_conv0(x: Tensor) -> bool:
    """Whether the fused stem computes conv0's output again in backward instead of keeping it, for an
    input ``x``: on a GPU, where the convolution costs a sliver of a step, and for volumes, where the
    full-resolution output is what memory runs out on. A 2-D stem on the CPU keeps it: computing it
    again costs about a fiftieth of a DenseNet-121 training step there, keeping it a fortieth of
    torchvision's peak memory (torchvision keeps it and the ReLU's output of its size)."""
    return x.dim() != 4 or x.device.type != "cpu"


# The stems forward_stem runs as one op: torchvision's and MONAI's, and timm's (its norm0 applies the ReLU).
STEMS = (("conv0", "norm0", "relu0", "pool0"), ("conv0", "norm0", "pool0"))


class Features(nn.Sequential):
    """torchvision's ``features`` Sequential; runs norm0-relu0-pool0 as one op that recomputes the
    normalised stem output in backward instead of keeping it (falls back to the plain sequence when
    those modules were replaced or carry hooks). ``backend`` picks that op's kernels."""

    def __init__(self, *args, backend: str = "auto") -> None:
        super().__init__(*args)
        self.backend = check_backend_name(backend)

    def stem_length(self) -> int:
        """How many leading modules ``forward_stem`` runs: 4 for conv0, norm0, relu0, pool0 (torchvision's
        and MONAI's stem), 3 for timm's conv0, norm0, pool0, 0 for any other stem (deep, anti-aliased)."""
        names = tuple(self._modules)[:4]
        return next((len(stem) for stem in STEMS if names[: len(stem)] == stem), 0)

    def stem_modules(self) -> tuple[nn.Module, nn.Module, nn.Module | None, nn.Module]:
        """conv0, norm0, relu0 (None in timm's stem: its norm0 applies the ReLU) and pool0; only when
        ``stem_length()`` is not 0."""
        stem = list(self._modules.values())[: self.stem_length()]
        return stem[0], stem[1], stem[2] if len(stem) == 4 else None, stem[-1]

    def forward_stem(self, x: Tensor) -> Tensor:
        """conv0, then norm0-relu0-pool0 as one op when they are the plain modules (else one by one); a
        plain bias-free conv0 joins that op, which computes its output again in backward instead of
        keeping it (the largest activation of the network, a full-resolution volume in 3-D), except in
        2-D on the CPU (``recomputes_conv0``). The fused stem runs channels-last, the layout of every
        block buffer after it (PyTorch's CPU max pool is more than ten times faster on it than on a
        contiguous map)."""
        conv0, norm0, relu0, pool0 = self.stem_modules()
        if isinstance(conv0, nn.modules.conv._ConvNd):  # a replaced conv0 checks its own input
            check_stem_input(x, conv0, conv0.weight.dim() - 2, PART_NAMES["stem"])
        if fusable(norm0, relu0, pool0):
            backend = resolve_backend(self.backend, x.device)
            if recomputable(conv0) and recomputes_conv0(x):  # conv0's output is computed again in backward
                return bn_relu_pool(channels_last(x), norm0, pool0, backend, conv=conv0)
            return bn_relu_pool(conv0(channels_last(x)), norm0, pool0, backend)
        for module in (conv0, norm0, relu0, pool0):
            if module is not None:
                x = module(x)
        return x

    def forward(self, x: Tensor, skip_last: bool = False) -> Tensor:
        if jit_compiling():  # TorchScript, torch.jit.trace: every module, one after the other
            return self.reference(x)
        return self._fused_forward(x, skip_last)

    def reference(self, x: Tensor) -> Tensor:
        """The modules one after the other, as the original ``features`` Sequential runs them."""
        for module in self:
            x = module(x)
        return x

    # A type comment: TorchScript cannot resolve an unused method's string annotations.
    @torch.jit.unused
    def _fused_forward(self, x, skip_last):
        # type: (Tensor, bool) -> Tensor
        chain = self.buffer_chain() if self._runs_in_buffers(x) else None
        if chain is not None:  # no autograd on the triton backend: one buffer handed to the next
            out, _ = self.forward_in_buffers(x, chain)
            return out if skip_last else self._modules["norm5"](out)
        modules = list(self._modules.items())
        if skip_last:  # the network's fused head runs the last module (norm5) itself
            modules = modules[:-1]
        stem_length = self.stem_length()
        if stem_length and not is_traced(x):
            x = self.forward_stem(x)
            modules = modules[stem_length:]
        for _, module in modules:
            x = module(x)
        return x

    def _runs_in_buffers(self, x: Tensor) -> bool:
        """Whether this forward may pass one buffer to the next: the triton backend with nothing for autograd
        to record (checked cheapest first: a training step stops at its first parameter)."""
        if is_traced(x) or resolve_backend(self.backend, x.device) != "triton":
            return False
        return not records_grad(x, self)

    def buffer_chain(self) -> list[tuple[FastDenseBlock, Transition | None]] | None:
        """The dense blocks and the transitions after them when this is the plain stem, then fastdense's
        blocks and fusing transitions in turn, then norm5, with no hooks anywhere (then inference can pass
        one buffer to the next), else None."""
        length, names = self.stem_length(), list(self._modules)
        modules = list(self._modules.values())
        if not length or names[-1] != "norm5" or (len(modules) - length) % 2 != 0:
            return None  # the middle is block, transition, ..., block: an odd count
        _, norm0, relu0, pool0 = self.stem_modules()
        if not fusable(norm0, relu0, pool0) or kernel_window(pool0) is None:
            return None
        middle = modules[length:-1]
        blocks, transitions = middle[0::2], [*middle[1::2], None]
        if not all(type(b) is FastDenseBlock for b in blocks):
            return None
        if not all(type(t) is Transition and t.fuses_into_next_block() for t in transitions[:-1]):
            return None
        if watched(self):
            return None
        return list(zip(blocks, transitions, strict=True))

    def forward_in_buffers(self, x: Tensor, chain) -> tuple[Tensor, KnownStats | None]:
        """The stem, blocks and transitions (not norm5) on the triton backend with no autograd: the stem's
        pool writes into block 1's buffer, each transition into the next block's buffer (no copies at block
        boundaries), and the BatchNorms after a block reuse its batch statistics in training mode. Returns
        the last block's output and its batch statistics."""
        from fastdense.kernels.bn_relu_pool import pooled_size

        conv0, norm0, _, pool0 = self.stem_modules()
        check_stem_input(x, conv0, 2, PART_NAMES["stem"])
        stem = conv0(x)
        kernel, stride, padding, _ = kernel_window(pool0)
        h, w = (pooled_size(s, k, stride, padding) for s, k in zip(stem.shape[2:], kernel, strict=True))
        n = stem.shape[0]
        blocks = [block for block, _ in chain]
        buffer = _block_buffer(blocks[0], n, h, w, stem.dtype, stem.device)
        triton_bn_relu_pool_into(stem, norm0, pool0, out=_first_channels(buffer, blocks[0]))
        for (block, transition), next_block in zip(chain, [*blocks[1:], None], strict=True):
            out, stats = block.forward_in_buffer(buffer)
            if transition is None:
                break
            cdt = compute_dtype(out)
            buffer = _block_buffer(next_block, n, h // 2, w // 2, cdt, x.device)
            into = _first_channels(buffer, next_block)
            fused_transition(out, transition.norm, transition.conv.weight, cdt, out=into, known=stats)
            n, h, w = buffer.shape[:3]
        return out, stats


class FastDenseNet(nn.Module):
    """DenseNet-BC with fast dense blocks; arguments and module tree as torchvision's ``DenseNet``.

    ``backend`` ("auto", "torch" or "triton") is passed to every dense block and can be changed later
    through the ``backend`` property; ``active_backend`` says what the last forward ran. TorchScript
    compiles torchvision's ``DenseNet.forward`` on the same modules (``reference``).
    """

    __jit_unused_properties__ = ("backend", "active_backend")  # Python only: not for TorchScript

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0,
        num_classes: int = 1000,
        memory_efficient: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self._backend = check_backend_name(backend)
        self.features = Features(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            ),
            backend=backend,
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = FastDenseBlock(
                num_layers=num_layers,
                num_input_features=num_features,
                bn_size=bn_size,
                growth_rate=growth_rate,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
                backend=backend,
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = Transition(num_features, num_features // 2, backend=backend)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self._active_backend: str | None = None
        self.classifier = nn.Linear(num_features, num_classes)

        # torchvision's initialisation, so a fresh model is distributed like a fresh torchvision one.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def dense_blocks(self) -> list[FastDenseBlock]:
        return [m for m in self.features if isinstance(m, FastDenseBlock)]

    @property
    def backend(self) -> str:
        """The requested backend of every part: dense blocks, stem, transitions and head."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend_name(value)
        for module in self.modules():
            if isinstance(module, (FastDenseBlock, Transition, Features)):
                module.backend = value

    @property
    def active_backend(self) -> str | None:
        """The backend the last forward ran; None before the first call."""
        return self._active_backend

    def _fusable_norm5(self) -> nn.BatchNorm2d | None:
        """norm5 when the head can run as one BN-ReLU-global-average-pool op (hooks on ``features``
        or on norm5 must fire, so they keep the plain sequence)."""
        norm5 = list(self.features._modules.items())[-1]
        features_hooked = self.features._forward_hooks or self.features._forward_pre_hooks
        if norm5[0] != "norm5" or features_hooked or not fusable(norm5[1], nn.ReLU(), nn.AvgPool2d(1)):
            return None
        return norm5[1]

    def _forward_in_buffers(self, x: Tensor, chain) -> Tensor:
        """Inference on the triton backend with no autograd: ``features`` passes one buffer to the next
        (``Features.forward_in_buffers``) and the head reuses the last block's batch statistics."""
        out, stats = self.features.forward_in_buffers(x, chain)
        pooled = triton_bn_relu_pool_into(out, self.features.norm5, global_average_pool(out), out=None, known=stats)
        return self.classifier(torch.flatten(pooled, 1))

    def feature_maps(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """The feature maps detectors and segmenters build on (timm's ``features_only``): ``"stem"``
        (after pool0, stride 4), each ``"denseblockN"`` output (strides 4, 8, 16, 32 for the ImageNet
        models; a block's output is its channels_last buffer) and ``"norm5"``, in order. Differentiable;
        runs the modules of ``features`` one by one, so hooks on them fire."""
        maps: OrderedDict[str, Tensor] = OrderedDict()
        modules = list(self.features.named_children())
        stem_length = self.features.stem_length()
        if stem_length:
            x = self.features.forward_stem(x)
            maps["stem"] = x
            modules = modules[stem_length:]
        for name, module in modules:
            x = module(x)
            if name.startswith("denseblock") or name == "norm5":
                maps[name] = x
        return maps

    def forward(self, x: Tensor) -> Tensor:
        if jit_compiling():  # TorchScript, torch.jit.trace
            return self.reference(x)
        return self._fused_forward(x)

    def reference(self, x: Tensor) -> Tensor:
        """torchvision's ``DenseNet.forward`` on these modules (each of them then runs its own reference)."""
        out = F.relu(self.features(x), inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        return self.classifier(torch.flatten(out, 1))

    @torch.jit.unused
    def _fused_forward(self, x):  # not annotated: TorchScript reads an unused method's real annotations
        if is_traced(x):  # FX: torchvision's sequence, blocks and transitions as call_module nodes
            out = F.adaptive_avg_pool2d(F.relu(self.features(x)), (1, 1))
            return self.classifier(torch.flatten(out, 1))
        self._active_backend = resolve_backend(self._backend, x.device)
        norm5 = self._fusable_norm5()
        in_buffers = norm5 is not None and self._active_backend == "triton" and not records_grad(x, self)
        chain = self.features.buffer_chain() if in_buffers else None
        if chain is not None:
            return self._forward_in_buffers(x, chain)
        if norm5 is None:
            out = F.relu(self.features(x), inplace=True)
            out = F.adaptive_avg_pool2d(out, (1, 1))
        else:  # the head's BatchNorm output and ReLU output are never stored
            out = self.features(x, skip_last=True)
            out = bn_relu_pool(out, norm5, global_average_pool(out), self._active_backend, part="head")
        return self.classifier(torch.flatten(out, 1))


def _block_buffer(block: FastDenseBlock, n: int, h: int, w: int, dtype: torch.dtype, device) -> Tensor:
    """An empty ``(N, H, W, C_total)`` buffer for ``block``."""
    c_total = block.num_input_features + block.num_layers * block.growth_rate
    return torch.empty((n, h, w, c_total), dtype=dtype, device=device)


def _first_channels(buffer: Tensor, block: FastDenseBlock) -> Tensor:
    """The rows of a block buffer's input channels, where the op before the block writes."""
    return buffer.view(-1, buffer.shape[-1])[:, : block.num_input_features]


def _densenet(
    growth_rate: int,
    block_config: tuple[int, ...],
    num_init_features: int,
    weights: tv_densenet.WeightsEnum | None,
    progress: bool,
    **kwargs: Any,
) -> FastDenseNet:
    if weights is not None:
        _ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = FastDenseNet(growth_rate, block_config, num_init_features, **kwargs)
    if weights is not None:
        # torchvision's own loader: fetches the checkpoint and remaps legacy keys ("norm.1" -> "norm1").
        tv_densenet._load_state_dict(model=model, weights=weights, progress=progress)
    return model


@handle_legacy_interface(weights=("pretrained", tv_densenet.DenseNet121_Weights.IMAGENET1K_V1))
def densenet121(
    *, weights: tv_densenet.DenseNet121_Weights | None = None, progress: bool = True, **kwargs: Any
) -> FastDenseNet:
    """DenseNet-121 (torchvision's ``densenet121`` arguments; ``backend=`` and the rest go to FastDenseNet)."""
    weights = tv_densenet.DenseNet121_Weights.verify(weights)
    return _densenet(32, (6, 12, 24, 16), 64, weights, progress, **kwargs)


@handle_legacy_interface(weights=("pretrained", tv_densenet.DenseNet161_Weights.IMAGENET1K_V1))
def densenet161(
    *, weights: tv_densenet.DenseNet161_Weights | None = None, progress: bool = True, **kwargs: Any
) -> FastDenseNet:
    """DenseNet-161 (torchvision's ``densenet161`` arguments)."""
    weights = tv_densenet.DenseNet161_Weights.verify(weights)
    return _densenet(48, (6, 12, 36, 24), 96, weights, progress, **kwargs)


@handle_legacy_interface(weights=("pretrained", tv_densenet.DenseNet169_Weights.IMAGENET1K_V1))
def densenet169(
    *, weights: tv_densenet.DenseNet169_Weights | None = None, progress: bool = True, **kwargs: Any
) -> FastDenseNet:
    """DenseNet-169 (torchvision's ``densenet169`` arguments)."""
    weights = tv_densenet.DenseNet169_Weights.verify(weights)
    return _densenet(32, (6, 12, 32, 32), 64, weights, progress, **kwargs)


@handle_legacy_interface(weights=("pretrained", tv_densenet.DenseNet201_Weights.IMAGENET1K_V1))
def densenet201(
    *, weights: tv_densenet.DenseNet201_Weights | None = None, progress: bool = True, **kwargs: Any
) -> FastDenseNet:
    """DenseNet-201 (torchvision's ``densenet201`` arguments)."""
    weights = tv_densenet.DenseNet201_Weights.verify(weights)
    return _densenet(32, (6, 12, 48, 32), 64, weights, progress, **kwargs)


def densenet264(*, weights: None = None, progress: bool = True, **kwargs: Any) -> FastDenseNet:
    """DenseNet-264 from the DenseNet paper (growth 32, blocks (6, 12, 64, 48), 64 initial features).

    torchvision publishes no weights for it, so ``weights`` must be None.
    """
    if weights is not None:
        raise ValueError(f"densenet264 has no pretrained weights; weights must be None, got {weights!r}")
    return _densenet(32, (6, 12, 64, 48), 64, None, progress, **kwargs)
