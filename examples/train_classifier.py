"""Train an image classifier on a folder of images with a fastdense DenseNet.

    python examples/train_classifier.py --data DIR [--convert torchvision|timm] [--amp bf16|fp16]
        [--epochs 10] [--batch-size 64] [--image-size 224] [--checkpoint ckpt.pt] [--resume]
    torchrun --nproc_per_node=8 examples/train_classifier.py --data DIR ...     # DDP, one process per GPU

DIR holds one folder per class (torchvision's ``ImageFolder``), with ``train/`` and ``val/`` inside, or
the class folders directly (then it trains and reports on the same images). The model is
``fastdense.densenet121`` or, with ``--convert``, torchvision's or timm's DenseNet-121 converted in place by
``fastdense.convert``: the one-line swap. The checkpoint holds the model's state_dict with torchvision's
(or timm's) keys: it loads into the original library's model, which the end of the run shows.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import transforms

import fastdense


def build_model(source: str, num_classes: int) -> torch.nn.Module:
    if source == "torchvision":
        return fastdense.convert(torchvision.models.densenet121(num_classes=num_classes))  # the one-line swap
    if source == "timm":
        import timm

        return fastdense.convert(timm.create_model("densenet121", num_classes=num_classes))
    return fastdense.densenet121(num_classes=num_classes)


def loaders(data: Path, image_size: int, batch_size: int, workers: int, distributed: bool):
    train_dir, val_dir = (data / "train", data / "val") if (data / "train").is_dir() else (data, data)
    augment = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor()])  # fmt: skip
    plain = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size),
                                transforms.ToTensor()])  # fmt: skip
    train_set = torchvision.datasets.ImageFolder(train_dir, augment)
    val_set = torchvision.datasets.ImageFolder(val_dir, plain)
    sampler = DistributedSampler(train_set) if distributed else None
    train = DataLoader(train_set, batch_size, shuffle=sampler is None, sampler=sampler, num_workers=workers,
                       drop_last=len(train_set) >= 2 * batch_size)  # fmt: skip
    return train, DataLoader(val_set, batch_size, num_workers=workers), len(train_set.classes), sampler


def peak_memory(device: torch.device) -> str:
    """What the run's memory peak is on this device, and its name: the tensors' peak on a GPU; on the CPU the
    process's resident high-water mark (tensors, the interpreter and its libraries together)."""
    if device.type == "cuda":
        return f"peak tensor memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    import resource

    return f"process peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--convert", choices=["torchvision", "timm"], help="convert this library's model instead")
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoint.pt"))
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    args = parser.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)

    train, val, num_classes, sampler = loaders(args.data, args.image_size, args.batch_size, args.workers, distributed)
    model = build_model(args.convert or "fastdense", num_classes).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)  # fp16 needs loss scaling
    start_epoch = 0
    if args.resume:
        checkpoint = torch.load(args.checkpoint, map_location=device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"] and scaler.is_enabled():  # (a bf16 or fp32 run's scaler has no state)
            scaler.load_state_dict(checkpoint["scaler"])
        start_epoch = checkpoint["epoch"] + 1
    trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                        else None) if distributed else model  # fmt: skip

    for epoch in range(start_epoch, args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        trained.train()
        seen, began = 0, time.perf_counter()
        for step, (images, labels) in enumerate(train, start=1):
            images = images.to(device, memory_format=torch.channels_last, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = F.cross_entropy(trained(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            seen += images.shape[0]
            if rank == 0:
                done = "#" * (20 * step // len(train))
                rate = seen / (time.perf_counter() - began)
                print(f"\repoch {epoch} [{done:20}] loss {loss.item():.3f} {rate:.1f} img/s", end="", flush=True)
        accuracy = evaluate(model, val, device, amp_dtype)
        if rank == 0:
            rate = seen / (time.perf_counter() - began)
            print(f"\repoch {epoch}: loss {loss.item():.3f}, {rate:.1f} img/s on this process, val accuracy "
                  f"{accuracy:.3f}, {peak_memory(device)}")  # fmt: skip
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                     "epoch": epoch}  # fmt: skip
            torch.save(state, args.checkpoint)

    if rank == 0 and args.convert != "timm":
        # The checkpoint's keys are torchvision's: it loads, strictly, into torchvision's own DenseNet-121.
        original = torchvision.models.densenet121(num_classes=num_classes)
        original.load_state_dict(torch.load(args.checkpoint, map_location="cpu")["model"])
        print(f"{args.checkpoint} loads into torchvision.models.densenet121: keys and shapes match")
    if distributed:
        dist.destroy_process_group()


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        images = images.to(device, memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            predictions = model(images).argmax(1).cpu()
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    return correct / max(total, 1)


if __name__ == "__main__":
    main()
