"""MONAI's dense-layer layout, as ``FastDenseBlock`` reads layers.

MONAI's ``_DenseLayer`` keeps its modules in a ``layers`` Sequential (``layers.norm1 ... layers.conv2``,
then ``layers.dropout`` when ``dropout_prob > 0``), so its state_dict keys are
``denselayerN.layers.norm1.weight``. ``SequentialDenseLayer`` holds that very Sequential, so the keys of
a converted model stay the original's, and shows its modules under the names the block reads.
"""

import torch
from torch import Tensor, nn

# Dropout modules that zero whole channels of a sample (one draw per sample and channel).
CHANNELWISE_DROPOUTS = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


class SequentialDenseLayer(nn.Module):
    """A dense layer whose modules sit in ``layers`` (MONAI's layout), seen under torchvision's names.

    Inside a ``FastDenseBlock`` its ``forward`` is never called; called on its own it returns
    ``cat([x, layers(x)])`` as MONAI's layer does.
    """

    memory_efficient = False
    # Python-only properties TorchScript must not try to compile.
    __jit_unused_properties__ = ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2", "dropout", "drop_rate",
                                 "channelwise_dropout")  # fmt: skip

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def _part(self, name: str) -> nn.Module:
        return self.layers._modules[name]

    norm1 = property(lambda self: self._part("norm1"))
    relu1 = property(lambda self: self._part("relu1"))
    conv1 = property(lambda self: self._part("conv1"))
    norm2 = property(lambda self: self._part("norm2"))
    relu2 = property(lambda self: self._part("relu2"))
    conv2 = property(lambda self: self._part("conv2"))

    @property
    def dropout(self) -> nn.Module | None:
        return self.layers._modules.get("dropout")

    @property
    def drop_rate(self) -> float:
        return 0.0 if self.dropout is None else float(self.dropout.p)

    @property
    def channelwise_dropout(self) -> bool:
        return isinstance(self.dropout, CHANNELWISE_DROPOUTS)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.layers(x)], 1)

    @torch.jit.export
    def new_features(self, x: Tensor) -> Tensor:
        """The layer's new feature maps from the concatenation ``x``: MONAI's ``layers`` (what TorchScript
        and ``torch.jit.trace`` run; ``FastDenseBlock.reference``)."""
        return self.layers(x)
