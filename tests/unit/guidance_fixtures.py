"""Shared by the guidance tests: a tiny random llama generator with the embedded model's
tokenizer (from benchmark_fixtures), a backbone and random preference classifiers on it."""

from __future__ import annotations

import torch

from fints.guidance.classifier import Backbone, ClassifierConfig, GuidanceClassifier, GuidanceHead
from fints.guidance.training import lead_ids
from fints.models import LoadedModel


def random_classifier(
    backbone: Backbone, name: str, classes: tuple[str, ...], seed: int, scale: float = 3.0
) -> GuidanceClassifier:
    """A head with large random weights: it visibly changes what the generator writes."""
    g = torch.Generator().manual_seed(seed)
    hidden = backbone.embeddings.shape[1]
    head = GuidanceHead(hidden, len(classes))
    with torch.no_grad():
        head.mix.copy_(scale * torch.randn(head.mix.shape, generator=g) / hidden**0.5)
        head.prior.weight.copy_(torch.randn(head.prior.weight.shape, generator=g))
    config = ClassifierConfig(
        name=name,
        classes=classes,
        backbone=backbone.name,
        backbone_fingerprint=backbone.fingerprint,
        tokenizer_fingerprint=backbone.tokenizer_fingerprint,
        layers=backbone.layers,
        hidden_size=hidden,
        lead_ids=lead_ids(backbone.tokenizer),
        metrics={"note": "random test head"},
    )
    return GuidanceClassifier(config, head, backbone)


def prompts(model: LoadedModel, texts: list[str]) -> list[list[int]]:
    return [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
