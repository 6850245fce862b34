#!/usr/bin/env python3
"""NNCLR in one plain PyTorch loop, no trainer: pre-train a small conv encoder on scikit-learn's
digits, then measure a k-NN accuracy on its frozen features.

    python examples/minimal_nnclr.py              # 150 epochs: k-NN 0.980 (raw pixels 0.978)
    python examples/minimal_nnclr.py --epochs 2

examples/train_nnclr.py is the full recipe (schedule, online probes, checkpoints, evaluation).
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from nnclr_fast import SupportQueue
from nnclr_fast.recipe.augment import SimCLRAugment
from nnclr_fast.recipe.evaluate import knn_accuracy
from nnclr_fast.recipe.losses import nnclr_loss
from nnclr_fast.recipe.models import NNCLR

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--epochs", type=int, default=150)
epochs = parser.parse_args().epochs
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"

digits = load_digits()
images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # (1797, 1, 8, 8) in [0, 1]
labels = torch.tensor(digits.target)
train, test = train_test_split(torch.arange(len(labels)), test_size=0.3, stratify=labels, random_state=0)

width = 64
layers = []
for channels in (1, width, width, width):  # four stride-2 convolutions: 16x16 -> 1x1
    layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
backbone = nn.Sequential(*layers, nn.Flatten())
model = NNCLR(backbone, feature_dim=width, proj_hidden_dim=256, proj_dim=64, pred_hidden_dim=256).to(device)
queue = SupportQueue(size=1024, dim=64).to(device)
# Per-image random crops, brightness/contrast and blur, upsampling the 8x8 digits to 16x16.
augment = SimCLRAugment(16, scale=(0.2, 1.0), flip_p=0.0, saturation=0.0, hue=0.0, gray_p=0.0, blur_sigma=(0.1, 1.0))
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
train_images = images[train].to(device)

for epoch in range(epochs):
    for idx in torch.randperm(len(train)).split(128)[:-1]:  # full batches only (batch norm, negatives)
        x1, x2 = augment(train_images[idx]), augment(train_images[idx])
        _, z, p = model(torch.cat([x1, x2]))  # both views in one batch: batch norm sees both
        p1, p2 = p.chunk(2)
        # Both views in one lookup; stop-gradient: the neighbour is a stored embedding, a constant.
        nn1, nn2 = queue.lookup(z, straight_through=False).chunk(2)
        queue.enqueue(z.chunk(2)[0].detach())  # view 1, after the lookup: a view is never its own neighbour
        loss = nnclr_loss(nn1, nn2, p1, p2, temperature=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"epoch {epoch + 1:3d}  loss {loss.item():.3f}")

model.eval()
with torch.no_grad():
    features = model.encoder(F.interpolate(images.to(device), size=16, mode="bilinear", align_corners=False))
accuracy = knn_accuracy(features[train], labels[train], features[test], labels[test], k=5)
print(f"k-NN (k=5, cosine) test accuracy on frozen features: {accuracy:.4f}")
