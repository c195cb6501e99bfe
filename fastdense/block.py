"""``FastDenseBlock``: a drop-in for torchvision's ``_DenseBlock`` on one shared buffer.

The module tree (``denselayer1..L``, each with ``norm1, relu1, conv1, norm2, relu2, conv2``) and hence
the state_dict are exactly torchvision's; only the block's forward differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import check_backend_name, resolve_backend
from .batchnorm import share_batch_stats
from .torch_backend import BlockPlan, DenseBlockFunction, block_forward
from .triton_backend import check_dtypes, triton_ops
from .validation import check_block_input, compute_dtype


class FastDenseLayer(nn.Module):
    """One dense layer: BN-ReLU-1x1 conv (bottleneck), BN-ReLU-3x3 conv, optional dropout.

    It holds the parameters under torchvision's names. Inside a ``FastDenseBlock`` its ``forward`` is
    never called (the block runs all layers on its shared buffer, so forward hooks on a layer do not
    fire); called on its own it behaves like torchvision's ``_DenseLayer``.
    """

    def __init__(
        self,
        num_input_features: int,
        growth_rate: int,
        bn_size: int,
        drop_rate: float,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:  # noqa: A002 - torchvision's name
        # Stand-alone use only (a FastDenseBlock never calls this): the plain reference computation.
        x = input if isinstance(input, Tensor) else torch.cat(input, 1)
        bottleneck = self.conv1(self.relu1(self.norm1(x)))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class FastDenseBlock(nn.ModuleDict):
    """A dense block whose layers share one preallocated channels_last buffer.

    Same signature and state_dict as torchvision's ``_DenseBlock``; ``backend`` picks the
    implementation (see ``fastdense.backend``). The output is the block's buffer: an
    ``(N, num_input_features + num_layers * growth_rate, H, W)`` tensor in channels_last memory format.
    The output is saved for backward, so modifying it in place before ``backward()`` raises autograd's
    usual error.
    """

    _version = 2

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
            )
            self.add_module(f"denselayer{i + 1}", layer)
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        self.bn_size = bn_size
        self.memory_efficient = memory_efficient
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
        )

    def _layer_params(self) -> tuple[Tensor, ...]:
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

    def _plan(self, x: Tensor, backend: str) -> BlockPlan:
        layers = list(self.values())
        eps1 = {layer.norm1.eps for layer in layers}
        if self.training and len(eps1) > 1:
            raise ValueError(
                f"FastDenseBlock: every norm1 of a block must use the same eps in training "
                f"(the batch statistics are shared), got {sorted(eps1)}"
            )
        for i, layer in enumerate(layers):
            if not 0.0 <= layer.drop_rate <= 1.0:
                raise ValueError(f"denselayer{i + 1}.drop_rate must be between 0 and 1, got {layer.drop_rate}")
        cdt = compute_dtype(x)
        if backend == "triton":
            check_dtypes(x, cdt)
        return BlockPlan(
            norms1=[layer.norm1 for layer in layers],
            norms2=[layer.norm2 for layer in layers],
            drop_rates=[layer.drop_rate for layer in layers],
            growth_rate=self.growth_rate,
            training=self.training,
            keep_bottlenecks=not self.memory_efficient,
            compute_dtype=cdt,
            eps1=layers[0].norm1.eps,
            ops=triton_ops() if backend == "triton" else None,
        )

    def _prepare(self, x: Tensor) -> tuple[tuple[Tensor, ...], BlockPlan]:
        params = self._layer_params()
        check_block_input(x, expected_channels=self.num_input_features, weight=params[2], training=self.training)
        backend = resolve_backend(self._backend, x.device)
        plan = self._plan(x, backend)
        self._active_backend = backend
        return params, plan

    def forward(self, x: Tensor) -> Tensor:
        params, plan = self._prepare(x)
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        with torch.autocast(x.device.type, enabled=False):
            if needs_grad:
                out = DenseBlockFunction.apply(x, plan, *params)
            else:
                with torch.no_grad():
                    out = block_forward(x, params, plan, save=False)[0]
        if plan.buffer_stats is not None:  # training: the next BatchNorm reading `out` reuses them
            share_batch_stats(out, *plan.buffer_stats)
        return out

    def forward_in_buffer(self, buffer: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Inference without autograd on a preallocated ``(N, H, W, C_total)`` buffer whose first
        ``num_input_features`` channels already hold the input (written there by the stem or the
        previous transition). Returns the output (the buffer as ``(N, C_total, H, W)``) and, in
        training mode, its batch statistics ``(var, mean)``."""
        x = buffer[..., : self.num_input_features].permute(0, 3, 1, 2)
        params, plan = self._prepare(x)
        with torch.autocast(x.device.type, enabled=False), torch.no_grad():
            out = block_forward(x, params, plan, save=False, buffer=buffer)[0]
        return out, plan.buffer_stats
