"""A user's own PyTorch training program: its own model, data and loop (not leap-train).

A small convnet on synthetic 16x16 images, optionally data-parallel under torchrun conventions
(DDP over gloo when WORLD_SIZE > 1). tests/test_sdk.py runs it as is and as train_cnn_leap.py,
the same program reporting to Leap with at most 3 changed lines.
"""

import argparse
import os
import time

import leap_trainer.sdk as leap
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, kernel_size=3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 16 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def make_data(samples: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(samples, 1, 16, 16, generator=generator)
    labels = (images.mean(dim=(1, 2, 3)) > 0).long() + 2 * (images[:, 0, :8].mean(dim=(1, 2)) > 0).long()
    return TensorDataset(images, labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4096)
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = build_model()
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dataset = make_data(args.samples)
    sampler = DistributedSampler(dataset, shuffle=True) if world > 1 else None
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
                        drop_last=True)
    loss_fn = nn.CrossEntropyLoss()
    leap.watch(model, optimizer, total_steps=args.epochs * len(loader))

    steps, started = 0, time.perf_counter()
    for epoch in range(args.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        for images, labels in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(images), labels)
            loss.backward()
            leap.record_loss(loss)
            optimizer.step()
            steps += 1
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}", flush=True)
    print(f"trained {steps} steps in {time.perf_counter() - started:.3f} s", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
