"""``FastDenseBlock``: a drop-in for torchvision's ``_DenseBlock`` on one shared buffer.

The module tree (``denselayer1..L``, each with ``norm1, relu1, conv1, norm2, relu2, conv2``) and hence
the state_dict are exactly torchvision's; only the block's forward differs. ``spatial_dims=3`` (or
``FastDenseBlock3d``) makes the 3-D block of volumetric DenseNets (MONAI's): BatchNorm3d, 1x1x1 and
3x3x3 convolutions, the same buffer, shared statistics and backward.
"""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import check_backend_name, resolve_backend
from .batchnorm import KnownStats, share_batch_stats
from .block_algorithm import BatchStats, BlockPlan, batch_stats_of, block_forward, update_block_running_stats
from .block_op import backend_ops, run_dense_block
from .observed import watched
from .sequential_layer import SequentialDenseLayer
from .sync_batchnorm import StatsSync, sync_group_name
from .torch_ops import EXPORT_OPS
from .tracing import call_module_node, exporting, is_traced, jit_compiling
from .triton_ops import check_dtypes
from .validation import autocast_off, check_block_input, compute_dtype, records_grad

SPATIAL_DIMS = (1, 2, 3)
# The layer modules per number of spatial dimensions (convert checks foreign layers against them too).
BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return spatial_dims


class FastDenseLayer(nn.Module):
    """One dense layer: BN-ReLU-1x1 conv (bottleneck), BN-ReLU-3x3 conv, optional dropout.

    It holds the parameters under torchvision's names. Inside a ``FastDenseBlock`` its ``forward`` is
    never called (the block runs all layers on its shared buffer, so forward hooks on a layer do not
    fire); called on its own it behaves like torchvision's ``_DenseLayer``. ``channelwise_dropout``
    drops whole channels of a sample (``F.dropout2d``/``dropout3d``, MONAI's choice) instead of values.
    """

    channelwise_dropout = False  # the class default: layers pickled before the attribute existed

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool = False,
        *,
        spatial_dims: int = 2,
        channelwise_dropout: bool = False,
    ) -> None:
        super().__init__()
        norm, conv = BATCH_NORMS[check_spatial_dims(spatial_dims)], CONVS[spatial_dims]
        self.norm1 = norm(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = norm(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient
        self.channelwise_dropout = channelwise_dropout

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torchvision's name
        # Stand-alone use only (a FastDenseBlock never calls this): the plain reference computation, on the
        # concatenation of a list of feature maps too (torchvision's layers take either).
        if torch.jit.is_scripting():
            return self.new_features(input)
        return self._eager_forward(input)

    @torch.jit.unused
    def _eager_forward(self, input):  # noqa: A002
        return self.new_features(input if isinstance(input, Tensor) else torch.cat(input, 1))

    @torch.jit.export
    def new_features(self, x: Tensor) -> Tensor:
        """The layer's new feature maps from the concatenation ``x`` of the earlier ones, computed as
        torchvision's ``_DenseLayer`` computes them: what TorchScript, ``torch.jit.trace`` and stand-alone
        calls run (the fused block runs every layer on its buffer instead)."""
        bottleneck = self.conv1(self.relu1(self.norm1(x)))
        new = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            if not self.channelwise_dropout:
                new = F.dropout(new, p=self.drop_rate, training=self.training)
            elif new.dim() == 3:
                new = F.dropout1d(new, p=self.drop_rate, training=self.training)
            elif new.dim() == 4:
                new = F.dropout2d(new, p=self.drop_rate, training=self.training)
            else:
                new = F.dropout3d(new, p=self.drop_rate, training=self.training)
        return new


class FastDenseBlock(nn.ModuleDict):
    """A dense block whose layers share one preallocated channels_last buffer.

    Same signature and state_dict as torchvision's ``_DenseBlock``; ``backend`` picks the
    implementation (see ``fastdense.backend``); ``spatial_dims`` (1, 2 or 3) the input's rank. The
    output is the block's buffer: an ``(N, num_input_features + num_layers * growth_rate, H, W)`` tensor
    (``(N, C, D, H, W)`` in 3-D) in channels-last memory format.
    The output is saved for backward, so modifying it in place before ``backward()`` raises autograd's
    usual error. TorchScript (``torch.jit.script``, ``torch.jit.trace``) compiles the original library's
    computation, ``torch.cat`` and the layers one by one, on the very same parameters (``reference``).
    """

    _version = 2
    # Python-only properties TorchScript must not try to compile.
    __jit_unused_properties__ = ("backend", "active_backend", "num_layers")

    def __init__(
        self,
        num_layers: int,
        num_input_features: int,
        bn_size: int,
        growth_rate: int,
        drop_rate: float = 0.0,
        memory_efficient: bool = False,
        *,
        backend: str = "auto",
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"FastDenseBlock: num_layers must be at least 1, got {num_layers}")
        for i in range(num_layers):
            layer = FastDenseLayer(
                num_input_features + i * growth_rate,
                growth_rate=growth_rate,
                bn_size=bn_size,
                drop_rate=drop_rate,
                memory_efficient=memory_efficient,
                spatial_dims=spatial_dims,
            )
            self.add_module(f"denselayer{i + 1}", layer)
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        self.bn_size = bn_size
        self.memory_efficient = memory_efficient
        self.spatial_dims = spatial_dims
        self.backend = backend
        self._active_backend: str | None = None

    @property
    def backend(self) -> str:
        """The requested backend: ``"auto"``, ``"torch"`` or ``"triton"``."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = check_backend_name(value)

    @property
    def active_backend(self) -> str | None:
        """The backend the last forward ran (``"torch"`` or ``"triton"``); None before the first call."""
        return self._active_backend

    @property
    def num_layers(self) -> int:
        return len(self)

    def extra_repr(self) -> str:
        ran = f", active_backend={self._active_backend!r}" if self._active_backend else ""
        return (
            f"num_layers={len(self)}, num_input_features={self.num_input_features}, "
            f"growth_rate={self.growth_rate}, bn_size={self.bn_size}, "
            f"memory_efficient={self.memory_efficient}, backend={self._backend!r}{ran}"
            + (f", spatial_dims={self.spatial_dims}" if self.spatial_dims != 2 else "")
        )

    def layer_params(self) -> tuple[Tensor, ...]:
        """Every layer's norm1 weight and bias, conv1 weight, norm2 weight and bias, conv2 weight."""
        return tuple(
            p
            for layer in self.values()
            for p in (
                layer.norm1.weight,
                layer.norm1.bias,
                layer.conv1.weight,
                layer.norm2.weight,
                layer.norm2.bias,
                layer.conv2.weight,
            )
        )

    def _check(self, x: Tensor) -> tuple[str, torch.dtype, str]:
        """Refuse what the block cannot run; the backend that runs ``x``, the compute dtype, and the
        process group whose batch statistics the block shares (SyncBatchNorm; "" for none)."""
        layers = list(self.values())
        check_block_input(
            x,
            expected_channels=self.num_input_features,
            weight=layers[0].conv1.weight,
            training=self.training,
            spatial_dims=self.spatial_dims,
            name=f"FastDenseBlock(num_layers={len(layers)}, num_input_features={self.num_input_features})",
        )
        eps1 = {layer.norm1.eps for layer in layers}
        if self.training and len(eps1) > 1:
            raise ValueError(
                f"FastDenseBlock: every norm1 of a block must use the same eps in training "
                f"(the batch statistics are shared), got {sorted(eps1)}"
            )
        for i, layer in enumerate(layers):
            if not 0.0 <= layer.drop_rate <= 1.0:
                raise ValueError(f"denselayer{i + 1}.drop_rate must be between 0 and 1, got {layer.drop_rate}")
        backend, cdt = resolve_backend(self._backend, x.device), compute_dtype(x)
        if backend == "triton":
            check_dtypes(x, cdt)
        norms = [norm for layer in layers for norm in (layer.norm1, layer.norm2)]
        sync_group = sync_group_name(norms, self.training, "FastDenseBlock")
        self._active_backend = backend
        return backend, cdt, sync_group

    def _plan(self, backend: str, cdt: torch.dtype, sync_group: str) -> BlockPlan:
        layers = list(self.values())
        return BlockPlan(
            norms1=[layer.norm1 for layer in layers],
            norms2=[layer.norm2 for layer in layers],
            drop_rates=[layer.drop_rate for layer in layers],
            channelwise_dropout=tuple(layer.channelwise_dropout for layer in layers),
            growth_rate=self.growth_rate,
            training=self.training,
            keep_bottlenecks=not self.memory_efficient,
            compute_dtype=cdt,
            eps1=layers[0].norm1.eps,
            ops=backend_ops(backend, self.spatial_dims),
            sync=StatsSync(sync_group) if sync_group else None,
        )

    def _update_running_stats(self, stats: BatchStats, count: int) -> None:
        layers = list(self.values())
        norms1, norms2 = [layer.norm1 for layer in layers], [layer.norm2 for layer in layers]
        update_block_running_stats(norms1, norms2, stats, count, self.growth_rate)

    def forward(self, x: Tensor) -> Tensor:
        if jit_compiling():  # TorchScript, torch.jit.trace
            return self.reference(x)
        return self._fused_forward(x)

    def reference(self, x: Tensor) -> Tensor:
        """The block as torchvision's ``_DenseBlock`` computes it (timm's and MONAI's blocks compute the
        same): each layer's new features from the concatenation of the earlier ones. What TorchScript
        compiles; exact to rounding against the fused forward."""
        features = [x]
        for layer in self.values():
            features.append(layer.new_features(torch.cat(features, 1)))
        return torch.cat(features, 1)

    def modules_forward(self, x: Tensor) -> Tensor:
        """The block as the original library runs it, each layer called as a module (``observed``): hooks
        on a layer or on its modules fire with the tensors the original block passes them. torchvision's
        and timm's layers take the list of earlier feature maps and return the new ones; MONAI's take
        the concatenation and return it with their new maps appended."""
        layers = list(self.values())
        if isinstance(layers[0], SequentialDenseLayer):
            for layer in layers:
                x = layer(x)
            return x
        features = [x]
        for layer in layers:
            features.append(layer(features))
        return torch.cat(features, 1)

    @torch.jit.unused
    def _fused_forward(self, x):  # not annotated: TorchScript reads an unused method's real annotations
        if is_traced(x):  # FX: one call_module node, run with real tensors later
            return call_module_node(self, x)
        if exporting() and not self.training:
            return self._exported_forward(x)
        backend, cdt, sync_group = self._check(x)
        if watched(*self.values()):  # a hook inside, or a counting dispatch mode: the layers one by one
            return self.modules_forward(x)
        needs_grad = records_grad(x, self)
        out, stats = run_dense_block(
            self, x, backend=backend, compute_dtype=cdt, save=needs_grad, sync_group=sync_group
        )
        if stats is not None:  # the global row count with SyncBatchNorm, else this batch's (no host sync)
            self._update_running_stats(stats, stats.count if sync_group else math.prod((x.shape[0], *x.shape[2:])))
            # The next BatchNorm reading `out` reuses them (eager only; and not global SyncBatchNorm ones,
            # which a plain BatchNorm after the block must not use).
            if not (torch.compiler.is_compiling() or sync_group):
                share_batch_stats(out, KnownStats(stats.stats, self._eps1()))
        return out

    def _exported_forward(self, x: Tensor) -> Tensor:
        """Eval mode under ``torch.export`` (and so ``torch.onnx.export(..., dynamo=True)``): the torch
        backend's algorithm traced into standard ATen operators instead of the registered block operator,
        so the exported program lowers to core ATen and to ONNX with no fastdense operator in it."""
        _, cdt, _ = self._check(x)
        plan = replace(self._plan("torch", cdt, ""), ops=EXPORT_OPS)
        with autocast_off(x.device.type), torch.no_grad():  # an inference graph
            out, _ = block_forward(x, self.layer_params(), plan, save=False)
        return out

    def _eps1(self) -> float:
        """The eps of the block's norm1s (the one its shared batch statistics' rstd is formed with)."""
        return float(next(iter(self.values())).norm1.eps)

    def forward_in_buffer(self, buffer: Tensor) -> tuple[Tensor, KnownStats | None]:
        """Inference without autograd on a preallocated ``(N, *spatial, C_total)`` buffer whose first
        ``num_input_features`` channels already hold the input (written there by the stem or the
        previous transition). Returns the output (the buffer as ``(N, C_total, *spatial)``) and, in
        training mode, its batch statistics."""
        x = buffer[..., : self.num_input_features].movedim(-1, 1)
        backend, cdt, sync_group = self._check(x)
        plan = self._plan(backend, cdt, sync_group)
        with autocast_off(x.device.type), torch.no_grad():
            out, state = block_forward(x, self.layer_params(), plan, save=False, buffer=buffer)
        if not self.training:
            return out, None
        stats = batch_stats_of(state, global_count=False)
        self._update_running_stats(stats, state.count)
        return out, KnownStats(stats.stats, self._eps1())


class FastDenseBlock3d(FastDenseBlock):
    """``FastDenseBlock(..., spatial_dims=3)``: the dense block of volumetric DenseNets on
    ``(N, C, D, H, W)`` inputs, with BatchNorm3d, 1x1x1 and 3x3x3 convolutions."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("spatial_dims", 3)
        super().__init__(*args, **kwargs)
