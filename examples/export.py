"""Deploy a fastdense DenseNet: ONNX (checked in onnxruntime), torch.export, and feature extraction.

    python examples/export.py [--checkpoint ckpt.pt] [--num-classes 1000] [--image-size 224] [--out densenet121.onnx]

``--checkpoint``: a state_dict with torchvision's keys (``examples/train_classifier.py`` writes one, under
"model"); without it the weights are random. Exports need no extra step: in eval mode a dense block
exports as standard ATen operators, and feature extraction sees blocks and transitions as nodes named
like their modules.
"""

from __future__ import annotations

import argparse

import torch
from torchvision.models.feature_extraction import create_feature_extractor

import fastdense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", default="densenet121.onnx")
    args = parser.parse_args()

    model = fastdense.densenet121(num_classes=args.num_classes)
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu")
        model.load_state_dict(state.get("model", state))
    model.eval()
    x = torch.randn(1, 3, args.image_size, args.image_size)
    with torch.no_grad():
        expected = model(x)

    # ONNX, through the dynamo exporter (onnxruntime, TensorRT).
    torch.onnx.export(model, (x,), dynamo=True).save(args.out)
    try:
        import onnxruntime
    except ImportError:
        print(f"wrote {args.out} (onnxruntime is not installed: not checked)")
    else:
        session = onnxruntime.InferenceSession(args.out)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        error = (torch.from_numpy(out) - expected).abs().max().item()
        print(f"wrote {args.out}; onnxruntime's output differs from eager by at most {error:.1e}")

    # torch.export, lowered to core ATen (ExecuTorch, AOTInductor, TensorRT).
    program = torch.export.export(model, (x,)).run_decompositions()
    error = (program.module()(x) - expected).abs().max().item()
    print(f"torch.export: {len(program.graph.nodes)} nodes, all core ATen; differs from eager by {error:.1e}")

    # Feature extraction for a detection or segmentation head: the dense blocks' outputs.
    body = create_feature_extractor(model, {f"features.denseblock{i}": f"c{i + 1}" for i in range(1, 5)})
    with torch.no_grad():
        maps = body(x)
    print("feature maps:", ", ".join(f"{name} {tuple(t.shape)}" for name, t in maps.items()))


if __name__ == "__main__":
    main()
