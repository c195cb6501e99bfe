"""Working inside the frameworks DenseNets live in (issue 6): timm models converted, feature maps for
detectors and segmenters, DistributedDataParallel training on two CPU processes (gloo), SyncBatchNorm."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch.nn.parallel import DistributedDataParallel

import fastdense
from fastdense.tools.verify import randomize_batchnorm, relative_error

from .test_densenet import SMALL, network_pair


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_feature_maps_match_torchvision_stages(training):
    ref, fast = network_pair(torch.float64)
    ref.train(training), fast.train(training)
    x = torch.randn(2, 3, 40, 36, dtype=torch.float64, requires_grad=True)
    maps = fast.feature_maps(x)
    expected, h = {}, x
    for name, module in ref.features.named_children():
        h = module(h)
        if name == "pool0":
            expected["stem"] = h
        elif name.startswith("denseblock") or name == "norm5":
            expected[name] = h
    assert list(maps) == ["stem", "denseblock1", "denseblock2", "denseblock3", "norm5"] == list(expected)
    for name, value in maps.items():
        assert value.shape == expected[name].shape
        assert relative_error(value, expected[name]) <= 1e-12, name
    (grad,) = torch.autograd.grad(sum(m.square().sum() for m in maps.values()), x)
    (ref_grad,) = torch.autograd.grad(sum(m.square().sum() for m in expected.values()), x)
    assert relative_error(grad, ref_grad) <= 1e-9


def _ddp_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    ref = randomize_batchnorm(torchvision.models.DenseNet(**SMALL), torch.Generator().manual_seed(1)).double()
    fast = fastdense.FastDenseNet(**SMALL, backend="torch").double()
    fast.load_state_dict(ref.state_dict())
    final = {}
    for name, model in (("torchvision", ref), ("fastdense", fast)):
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
        for _ in range(3):
            x = torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64)
            y = torch.randint(0, SMALL["num_classes"], (4,), generator=generator)
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        final[name] = {k: v.clone() for k, v in model.state_dict().items()}
    results[rank] = final
    dist.destroy_process_group()


def test_distributed_data_parallel_matches_torchvision():
    """Two gloo processes train under DDP for three steps; on every rank the fastdense model ends with
    torchvision's parameters and buffers (DDP averages gradients and broadcasts rank 0's buffers)."""
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        init_file = os.path.join(tmp, "init")
        mp.spawn(_ddp_worker, args=(2, init_file, results), nprocs=2, join=True)
        for key, value in results[0]["fastdense"].items():  # DDP did synchronise: ranks share parameters
            if "running" not in key and "num_batches" not in key:
                assert torch.equal(value, results[1]["fastdense"][key]), key
        for rank in range(2):
            final = results[rank]
            for key, value in final["torchvision"].items():
                got = final["fastdense"][key]
                if value.is_floating_point():
                    assert relative_error(got, value) <= 1e-9, (rank, key)
                else:
                    assert torch.equal(got, value), (rank, key)
        manager.shutdown()


def sync_model(dtype=torch.float64) -> torch.nn.Module:
    """A stem conv, a torchvision dense block, pooling and a classifier: every BatchNorm is in the block."""
    from torchvision.models.densenet import _DenseBlock

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1, bias=False),
        _DenseBlock(3, 6, 2, 4, drop_rate=0.0),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(18, 5),
    )
    return randomize_batchnorm(model, torch.Generator().manual_seed(1)).to(dtype)


SYNC_STEPS, SYNC_BATCH, WORLD = 3, 8, 2


def sync_data(step: int):
    generator = torch.Generator().manual_seed(200 + step)
    x = torch.randn(SYNC_BATCH, 3, 7, 6, generator=generator, dtype=torch.float64)
    return x, torch.randn(SYNC_BATCH, 5, generator=generator, dtype=torch.float64)


def _sync_worker(rank: int, world: int, init_file: str, backend: str, compiled: bool, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dtype = torch.float64 if backend == "torch" else torch.float32  # triton: float32 at most
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(sync_model(dtype))
    model = fastdense.convert(model, strict=True, backend=backend)
    assert isinstance(model[1], fastdense.FastDenseBlock)
    run = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    shard = slice(rank * SYNC_BATCH // world, (rank + 1) * SYNC_BATCH // world)
    for step in range(SYNC_STEPS):
        x, weights = sync_data(step)
        optimizer.zero_grad()
        (run(x[shard].to(dtype)) * weights[shard].to(dtype)).sum().backward()
        # DDP's gradient average, by hand: DistributedDataParallel refuses SyncBatchNorm on CPU modules.
        for param in model.parameters():
            dist.all_reduce(param.grad)
            param.grad /= world
        optimizer.step()
    results[rank] = {k: v.clone() for k, v in model.state_dict().items()}
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("backend", "compiled"), [("torch", False), ("triton", False), ("torch", True)], ids=["torch", "triton", "compiled"]
)
def test_sync_batchnorm_over_two_processes_matches_one_process_on_the_global_batch(backend, compiled):
    """SyncBatchNorm in converted blocks, two gloo processes each with half of every batch, gradients
    averaged as DDP does: the parameters and running statistics after three SGD steps are those of
    torchvision's block trained in one process on the whole batch (the loss divided by the world size).
    Also compiled with fullgraph=True: the collectives run inside the block operator."""
    reference = sync_model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for step in range(SYNC_STEPS):
        x, weights = sync_data(step)
        optimizer.zero_grad()
        ((reference(x) * weights).sum() / WORLD).backward()
        optimizer.step()
    with tempfile.TemporaryDirectory() as tmp:
        manager = mp.Manager()
        results = manager.dict()
        init_file = os.path.join(tmp, "init")
        mp.spawn(_sync_worker, args=(WORLD, init_file, backend, compiled, results), nprocs=WORLD, join=True)
        tolerance = 1e-9 if backend == "torch" else 1e-5
        for rank in range(WORLD):
            for key, expected in reference.state_dict().items():
                got = results[rank][key]
                if expected.is_floating_point():
                    assert relative_error(got, expected) <= tolerance, (rank, key)
                else:
                    assert torch.equal(got, expected), (rank, key)
        manager.shutdown()


def test_sync_batchnorm_outside_a_process_group_is_batchnorm():
    """Without an initialised process group (or in eval) SyncBatchNorm normalises like BatchNorm2d."""
    converted = fastdense.convert(torch.nn.SyncBatchNorm.convert_sync_batchnorm(sync_model()), strict=True)
    reference = sync_model()
    x = torch.randn(4, 3, 7, 6, dtype=torch.float64)
    assert relative_error(converted(x), reference(x)) <= 1e-12


def test_a_block_mixing_sync_batchnorm_with_batchnorm_stays_with_a_warning():
    model = sync_model()
    layer = model[1].denselayer2
    layer.norm1 = torch.nn.SyncBatchNorm.convert_sync_batchnorm(layer.norm1)
    with pytest.warns(UserWarning, match="mixes SyncBatchNorm with other BatchNorms"):
        fastdense.convert(model)
    assert not isinstance(model[1], fastdense.FastDenseBlock)


def timm_pair(**kwargs):
    """A timm DenseNet with random weights and BatchNorm state, and a converted deep copy."""
    import copy

    import timm  # pinned in requirements.txt

    torch.manual_seed(0)
    config = {"growth_rate": 4, "block_config": (2, 3), "bn_size": 2, "num_classes": 5} | kwargs
    original = randomize_batchnorm(timm.models.densenet.DenseNet(**config), torch.Generator().manual_seed(1))
    return original.double(), fastdense.convert(copy.deepcopy(original).double())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_timm_densenet_converts_exactly(training):
    from fastdense.tools.verify import compare

    original, converted = timm_pair()
    assert sum(isinstance(m, fastdense.FastDenseBlock) for m in converted.modules()) == 2
    # The stem (conv0, norm0, pool0: timm's norm0 applies the ReLU) and the transition run fused, as in the
    # built model: fastdense's Features and Transition holding timm's own modules.
    features = converted.features
    assert type(features) is fastdense.densenet.Features and features.stem_length() == 3
    assert type(features.transition1) is fastdense.Transition and features.transition1.exact()
    assert features.norm0 is not original.features.norm0 and type(features.norm0) is type(original.features.norm0)
    assert list(converted.state_dict()) == list(original.state_dict())
    inputs = [torch.randn(2, 3, 40, 36, dtype=torch.float64) for _ in range(2)]
    errors = compare(converted, original, inputs, training)
    assert max(errors.values()) <= 1e-9, errors


def test_timm_blur_densenet_converts_its_dense_blocks():
    """densenetblur121d (deep stem, blur-pool transitions): its dense blocks are standard and convert;
    the state_dict keys stay timm's and the logits agree."""
    import timm

    torch.manual_seed(0)
    original = randomize_batchnorm(timm.create_model("densenetblur121d", pretrained=False)).eval()
    keys = list(original.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = original(x)
        converted = fastdense.convert(original)
        got = converted(x)
    assert sum(isinstance(m, fastdense.FastDenseBlock) for m in converted.modules()) == 4
    assert list(converted.state_dict()) == keys
    assert relative_error(got, expected) <= 1e-5


def test_timm_blocks_with_another_activation_stay_with_a_warning():
    import timm

    model = timm.models.densenet.DenseNet(growth_rate=4, block_config=(2,), bn_size=2, act_layer="silu")
    with pytest.warns(UserWarning, match="other than BatchNorm2d followed by ReLU"):
        fastdense.convert(model)
    assert not any(isinstance(m, fastdense.FastDenseBlock) for m in model.modules())


def test_strict_conversion_raises_before_changing_anything():
    import timm

    model = timm.models.densenet.DenseNet(growth_rate=4, block_config=(2, 2), bn_size=2)
    model.features.denseblock2.denselayer1.norm1.act = torch.nn.GELU()  # one block no longer exact
    with pytest.raises(ValueError, match=r"strict=True.*features.denseblock2.*ReLU"):
        fastdense.convert(model, strict=True)
    assert not any(isinstance(m, fastdense.FastDenseBlock) for m in model.modules())  # untouched
    with pytest.warns(UserWarning, match="features.denseblock2"):
        fastdense.convert(model)
    assert isinstance(model.features.denseblock1, fastdense.FastDenseBlock)
    assert not isinstance(model.features.denseblock2, fastdense.FastDenseBlock)
