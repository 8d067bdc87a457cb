"""The reference recipe written out as the tutorial has it (not the product's code).

Gatys style transfer from the PyTorch/Udacity tutorial: VGG19 `features`,
style layers conv1_1..conv5_1 weighted 1/.75/.2/.2/.2, content conv4_2,
alpha 1, beta 1e6, Gram loss / (d*h*w), Adam lr 0.003 on ImageNet-normalized
pixels, 2000 steps, init from the content. Kept as close to the tutorial's
code as the benchmark allows: only the weights source (a state dict, so every
method uses the same file) and the per-step timing hooks are added.
"""
from __future__ import annotations

import time

import torch
import torch.optim as optim
from torchvision import models, transforms

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def load_vgg(features_state: dict) -> torch.nn.Module:
    vgg = models.vgg19(weights=None).features
    vgg.load_state_dict(features_state, strict=False)  # the file holds layers up to conv5_1
    for param in vgg.parameters():
        param.requires_grad_(False)
    return vgg


def load_image(image, max_size=400, shape=None):
    """The tutorial's loader, taking a PIL image instead of a path."""
    image = image.convert("RGB")
    size = max_size if max(image.size) > max_size else max(image.size)
    if shape is not None:
        size = shape
    in_transform = transforms.Compose([
        transforms.Resize(size),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    return in_transform(image)[:3, :, :].unsqueeze(0)


def get_features(image, model, layers=None):
    if layers is None:
        layers = {"0": "conv1_1", "5": "conv2_1", "10": "conv3_1",
                  "19": "conv4_1", "21": "conv4_2", "28": "conv5_1"}
    features = {}
    x = image
    for name, layer in model._modules.items():
        x = layer(x)
        if name in layers:
            features[layers[name]] = x
    return features


def gram_matrix(tensor):
    _, d, h, w = tensor.size()
    tensor = tensor.view(d, h * w)
    return torch.mm(tensor, tensor.t())


STYLE_WEIGHTS = {"conv1_1": 1.0, "conv2_1": 0.75, "conv3_1": 0.2, "conv4_1": 0.2, "conv5_1": 0.2}
CONTENT_WEIGHT = 1  # alpha
STYLE_WEIGHT = 1e6  # beta


def total_loss(target, content_features, style_grams, vgg):
    target_features = get_features(target, vgg)
    content_loss = torch.mean((target_features["conv4_2"] - content_features["conv4_2"]) ** 2)
    style_loss = 0
    for layer in STYLE_WEIGHTS:
        target_feature = target_features[layer]
        target_gram = gram_matrix(target_feature)
        _, d, h, w = target_feature.shape
        style_gram = style_grams[layer]
        layer_style_loss = STYLE_WEIGHTS[layer] * torch.mean((target_gram - style_gram) ** 2)
        style_loss += layer_style_loss / (d * h * w)
    return CONTENT_WEIGHT * content_loss + STYLE_WEIGHT * style_loss


def run(content, style, vgg, steps=2000, lr=0.003, on_step=None):
    """content/style: normalized (1,3,H,W). Returns the final normalized target.
    `on_step(step, loss, seconds_so_far)` is called after every step."""
    content_features = get_features(content, vgg)
    style_features = get_features(style, vgg)
    style_grams = {layer: gram_matrix(style_features[layer]) for layer in style_features}
    target = content.clone().requires_grad_(True)
    optimizer = optim.Adam([target], lr=lr)
    start = time.perf_counter()
    for ii in range(1, steps + 1):
        loss = total_loss(target, content_features, style_grams, vgg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(ii, loss.item(), time.perf_counter() - start)
    return target.detach()


def score(pixels, content, style, vgg):
    """The recipe's own loss of a [0,1] image (1,3,H,W), e.g. a decoded 8-bit PNG."""
    mean = torch.tensor(MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=pixels.device).view(1, 3, 1, 1)
    with torch.no_grad():
        content_features = get_features(content, vgg)
        style_features = get_features(style, vgg)
        style_grams = {layer: gram_matrix(style_features[layer]) for layer in style_features}
        return total_loss((pixels - mean) / std, content_features, style_grams, vgg).item()
