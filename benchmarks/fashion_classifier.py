#!/usr/bin/env python
"""A small Fashion-MNIST CNN that scores generated images: prompted-class accuracy, and its penultimate features for
a Frechet distance cheap enough for a CPU (the Inception FID costs 0.25 s per image on one core).

Images are read at 32x32, grey, in [-1, 1], exactly as the text-to-image teacher is trained on them
(`data.image_transform(32, 1)`). Trained on the 60k training split, accuracy reported on the 10k test split:

    python benchmarks/fashion_classifier.py --output_dir benchmarks/results/text-to-image-fashion/classifier
"""

import argparse
import io
import json
import time
from pathlib import Path

import torch
from torch import nn

from diffusers_pd.atomic import atomic_write_bytes, atomic_write_text
from diffusers_pd.data import image_transform, load_fashion_mnist

RESOLUTION = 32


class FashionClassifier(nn.Module):
    """3 conv + max-pool blocks (16, 32, 64 channels), a 128-d feature layer, 10 logits; input (N, 1, 32, 32) in [-1, 1]."""

    num_features = 128

    def __init__(self):
        super().__init__()
        blocks = []
        for c_in, c_out in ((1, 16), (16, 32), (32, 64)):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(64 * 4 * 4, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class ClassifierFeatures(nn.Module):
    """uint8 (N, 1, 32, 32) images -> the classifier's 128-d features: a feature model for `evaluation.fid`."""

    def __init__(self, classifier: FashionClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float() / 127.5 - 1)


def load_classifier(folder) -> FashionClassifier:
    """The classifier saved by this script in `folder`."""
    classifier = FashionClassifier()
    classifier.load_state_dict(torch.load(Path(folder) / "classifier.pt", map_location="cpu", weights_only=True))
    return classifier.eval()


def split_tensors(split: str):
    """(images (N, 1, 32, 32) in [-1, 1], labels (N,)) of a Fashion-MNIST split."""
    dataset = load_fashion_mnist(split)
    transform = image_transform(RESOLUTION, 1, center_crop=True)
    return torch.stack([transform(image) for image in dataset["image"]]), torch.tensor(dataset["label"])


@torch.no_grad()
def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Fraction of images whose arg-max logit is their label."""
    hits = sum((classifier(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
               for i in range(0, len(images), batch_size))
    return hits / len(images)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.time()
    train_images, train_labels = split_tensors("train")
    test_images, test_labels = split_tensors("test")
    torch.manual_seed(args.seed)
    classifier = FashionClassifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.learning_rate)
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        classifier.train()
        order = torch.randperm(len(train_images), generator=generator)
        for start in range(0, len(order), args.batch_size):
            batch = order[start:start + args.batch_size]
            loss = nn.functional.cross_entropy(classifier(train_images[batch]), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        classifier.eval()
        print(f"epoch {epoch}: test accuracy {accuracy(classifier, test_images, test_labels):.4f}", flush=True)
    result = {"test_accuracy": accuracy(classifier, test_images, test_labels),
              "train_accuracy": accuracy(classifier, train_images, train_labels), "epochs": args.epochs,
              "seconds": round(time.time() - started, 1), "machine": "shared 2-core CPU, 1 thread",
              "parameters": sum(p.numel() for p in classifier.parameters())}
    buffer = io.BytesIO()
    torch.save(classifier.state_dict(), buffer)
    atomic_write_bytes(Path(args.output_dir) / "classifier.pt", buffer.getvalue())
    atomic_write_text(Path(args.output_dir) / "classifier.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
