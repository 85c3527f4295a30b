"""Training a classifier's head on labelled text, the backbone frozen.

CLIPer's objective: at every position of a text, the class of the whole text is the
target for the token that actually comes next (token-level cross-entropy). With the
backbone frozen, its hidden states are computed once (one forward pass over the data)
and the head is trained on them: minutes on a CPU instead of hours.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fints.errors import InvalidInputError
from fints.guidance.classifier import (
    Backbone,
    ClassifierConfig,
    GuidanceClassifier,
    GuidanceHead,
)

#: ``progress(stage, done, total)``: called as features are computed and as the head trains.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class TrainConfig:
    max_tokens: int = 48  # of each text (guidance matters most early in an answer)
    epochs: int = 4
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_tokens: int = 1024
    feature_batch: int = 16
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Features:
    """Per position of the training texts: the backbone's hidden state of the prefix, the
    token that comes next, which text it belongs to and that text's class."""

    hidden: torch.Tensor  # [positions, hidden]
    next_ids: torch.Tensor  # [positions]
    text: torch.Tensor  # [positions]
    labels: torch.Tensor  # [positions]


def lead_ids(tokenizer: Any) -> tuple[int, ...]:
    """What a classifier reads before the first new token: the BOS token (else EOS)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
    token = token if token is not None else tokenizer.eos_token_id
    if token is None:
        raise InvalidInputError("the backbone's tokenizer has neither a BOS nor an EOS token")
    return (int(token),)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    lead = list(lead_ids(tokenizer))
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [lead + list(ids[:max_tokens]) for ids in encoded]


@torch.no_grad()
def compute_features(
    backbone: Backbone,
    sequences: Sequence[Sequence[int]],
    labels: Sequence[int],
    batch_size: int = 16,
    progress: Progress | None = None,
) -> Features:
    hidden, next_ids, text, classes = [], [], [], []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        states, _ = backbone.forward(ids.to(backbone.device), mask.to(backbone.device))
        states = states.cpu()
        for row, seq in enumerate(chunk):
            n = len(seq) - 1  # positions with a next token
            if n < 1:
                continue
            hidden.append(states[row, :n])
            next_ids.append(torch.tensor(seq[1:]))
            text.append(torch.full((n,), start + row))
            classes.append(torch.full((n,), labels[start + row]))
        if progress is not None:
            progress("features", min(start + batch_size, len(sequences)), len(sequences))
    if not hidden:
        raise InvalidInputError("no text has a token to learn from")
    return Features(torch.cat(hidden), torch.cat(next_ids), torch.cat(text), torch.cat(classes))


def token_log_probs(
    head: GuidanceHead, embeddings: torch.Tensor, features: Features, batch: int = 4096
) -> torch.Tensor:
    """``log p(c | prefix, next token)`` at every position ``[positions, classes]``."""
    out = []
    with torch.no_grad():
        for start in range(0, len(features.next_ids), batch):
            h = features.hidden[start : start + batch]
            e = embeddings[features.next_ids[start : start + batch]].unsqueeze(1)
            out.append(head.candidates(h, e)[:, 0].log_softmax(-1))
    return torch.cat(out)


def evaluate(head: GuidanceHead, embeddings: torch.Tensor, features: Features) -> dict[str, float]:
    """Token accuracy (each position alone) and text accuracy (log-probabilities averaged
    over a text's positions), as fractions."""
    log_p = token_log_probs(head, embeddings, features)
    token_acc = (log_p.argmax(-1) == features.labels).float().mean().item()
    texts = int(features.text.max()) + 1
    sums = torch.zeros(texts, log_p.shape[1]).index_add_(0, features.text, log_p)
    counts = torch.zeros(texts).index_add_(0, features.text, torch.ones(len(features.text)))
    seen = counts > 0
    truth = torch.full((texts,), -1, dtype=torch.long)
    truth[features.text] = features.labels
    text_acc = (sums[seen].argmax(-1) == truth[seen]).float().mean().item()
    return {"token_accuracy": round(token_acc, 4), "text_accuracy": round(text_acc, 4)}


def train_head(
    features: Features,
    embeddings: torch.Tensor,
    n_classes: int,
    config: TrainConfig,
    progress: Progress | None = None,
) -> GuidanceHead:
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    head = GuidanceHead(features.hidden.shape[1], n_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = len(features.next_ids)
    steps = config.epochs * ((n + config.batch_tokens - 1) // config.batch_tokens)
    done = 0
    head.train()
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_tokens):
            pick = order[start : start + config.batch_tokens]
            e = embeddings[features.next_ids[pick]].unsqueeze(1)
            logits = head.candidates(features.hidden[pick], e)[:, 0]
            loss = torch.nn.functional.cross_entropy(logits, features.labels[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if progress is not None:
                progress("head", done, steps)
    return head.eval()


@dataclass(frozen=True)
class LabelledTexts:
    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels) or not self.texts:
            raise InvalidInputError("labelled texts need as many labels as texts, and some texts")


def train_classifier(
    name: str,
    backbone: Backbone,
    train: LabelledTexts,
    test: LabelledTexts | None = None,
    config: TrainConfig | None = None,
    progress: Progress | None = None,
    extra_metrics: dict[str, Any] | None = None,
) -> GuidanceClassifier:
    """A classifier ``name`` over the classes of ``train`` (sorted), its head trained on
    ``train`` and measured on ``test``; the figures are kept in its config's metrics."""
    config = config or TrainConfig()
    classes = tuple(sorted(set(train.labels)))
    if len(classes) < 2:
        raise InvalidInputError(f"{name}: training needs at least two classes, got {classes}")
    index = {c: n for n, c in enumerate(classes)}
    tok = backbone.tokenizer
    began = time.perf_counter()
    features = compute_features(
        backbone,
        encode_texts(tok, train.texts, config.max_tokens),
        [index[c] for c in train.labels],
        config.feature_batch,
        progress,
    )
    feature_seconds = time.perf_counter() - began
    embeddings = backbone.embeddings.float().cpu()
    began = time.perf_counter()
    head = train_head(features, embeddings, len(classes), config, progress)
    metrics: dict[str, Any] = {
        "train_texts": len(train.texts),
        "train_positions": len(features.next_ids),
        "feature_seconds": round(feature_seconds, 1),
        "head_seconds": round(time.perf_counter() - began, 1),
        "train": evaluate(head, embeddings, features),
        "settings": config.to_dict(),
        **(extra_metrics or {}),
    }
    if test is not None:
        unknown = sorted(set(test.labels) - set(classes))
        if unknown:
            raise InvalidInputError(f"{name}: test labels {unknown} are not training classes")
        held = compute_features(
            backbone,
            encode_texts(tok, test.texts, config.max_tokens),
            [index[c] for c in test.labels],
            config.feature_batch,
            progress,
        )
        metrics["test"] = {"texts": len(test.texts), **evaluate(head, embeddings, held)}
        metrics["chance"] = round(max(test.labels.count(c) for c in classes) / len(test.labels), 4)
    cfg = ClassifierConfig(
        name=name,
        classes=classes,
        backbone=backbone.name,
        backbone_fingerprint=backbone.fingerprint,
        tokenizer_fingerprint=backbone.tokenizer_fingerprint,
        layers=backbone.layers,
        hidden_size=int(features.hidden.shape[1]),
        lead_ids=lead_ids(tok),
        metrics=metrics,
    )
    return GuidanceClassifier(cfg, head.to(backbone.device), backbone)
