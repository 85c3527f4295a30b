"""Training a classifier's head on labelled text, the backbone frozen.

CLIPer's objective: at every position of a text, the class of the whole text is the
target for the token that actually comes next (token-level cross-entropy). With the
backbone frozen, its hidden states are computed once (one forward pass over the data)
and the head is trained on them: minutes on a CPU instead of hours.

Two things keep its probabilities usable as a guidance term ``alpha * log p(c | ...)``:
the loss weights each class by its inverse frequency (``balanced``: a user's 40 texts
against 256 others' count as much as them, so the head does not learn the majority
class), and afterwards one temperature T > 0 is fitted on held-out texts (the test set,
else a share of the training texts kept out of the head's training) by minimizing the
token-level class NLL of logits / T (``calibrate``). An overconfident head gets T > 1.
"""

from __future__ import annotations

import math
import random
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
    balanced: bool = True  # weight each class's positions by its inverse frequency
    calibrate: bool = True  # fit a temperature on held-out texts after training
    calibration_share: float = 0.2  # of each class's training texts, when no test set

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


def token_logits(
    head: GuidanceHead, embeddings: torch.Tensor, features: Features, batch: int = 4096
) -> torch.Tensor:
    """The head's class logits for the next token at every position ``[positions, classes]``."""
    out = []
    with torch.no_grad():
        for start in range(0, len(features.next_ids), batch):
            h = features.hidden[start : start + batch]
            e = embeddings[features.next_ids[start : start + batch]].unsqueeze(1)
            out.append(head.candidates(h, e)[:, 0])
    return torch.cat(out)


def token_log_probs(
    head: GuidanceHead,
    embeddings: torch.Tensor,
    features: Features,
    batch: int = 4096,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``log p(c | prefix, next token)`` at every position ``[positions, classes]``."""
    return (token_logits(head, embeddings, features, batch) / temperature).log_softmax(-1)


def _balanced_accuracy(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """The mean over the classes present of the share of their items predicted right."""
    recalls = [(predicted[truth == c] == c).float().mean().item() for c in truth.unique()]
    return sum(recalls) / len(recalls)


def evaluate(
    head: GuidanceHead, embeddings: torch.Tensor, features: Features, temperature: float = 1.0
) -> dict[str, float]:
    """Token accuracy (each position alone) and text accuracy (log-probabilities averaged
    over a text's positions), as fractions, each also balanced (the mean of the classes'
    recalls: 0.5 for always naming one of two classes)."""
    log_p = token_log_probs(head, embeddings, features, temperature=temperature)
    token_pred = log_p.argmax(-1)
    token_acc = (token_pred == features.labels).float().mean().item()
    texts = int(features.text.max()) + 1
    sums = torch.zeros(texts, log_p.shape[1]).index_add_(0, features.text, log_p)
    counts = torch.zeros(texts).index_add_(0, features.text, torch.ones(len(features.text)))
    seen = counts > 0
    truth = torch.full((texts,), -1, dtype=torch.long)
    truth[features.text] = features.labels
    text_pred = sums[seen].argmax(-1)
    text_acc = (text_pred == truth[seen]).float().mean().item()
    return {
        "token_accuracy": round(token_acc, 4),
        "text_accuracy": round(text_acc, 4),
        "token_balanced_accuracy": round(_balanced_accuracy(token_pred, features.labels), 4),
        "text_balanced_accuracy": round(_balanced_accuracy(text_pred, truth[seen]), 4),
    }


def class_weights(labels: torch.Tensor, n_classes: int, balanced: bool) -> torch.Tensor:
    """Per class the weight of each of its positions in the loss ``[n_classes]``: 1 each,
    or (``balanced``) ``positions / (classes present * the class's positions)``, so that
    every class present weighs as much in total (and the weights average 1 per position)."""
    counts = torch.bincount(labels, minlength=n_classes).double()
    if not balanced:
        return torch.ones(n_classes)
    present = counts > 0
    weights = torch.zeros(n_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def class_nll(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> float:
    """The (class-weighted) mean token-level NLL of ``labels`` under ``softmax(logits / T)``."""
    log_p = (logits.double() / temperature).log_softmax(-1)
    nll = -log_p.gather(1, labels[:, None])[:, 0]
    if weights is None:
        return float(nll.mean())
    w = weights.double()[labels]
    return float((nll * w).sum() / w.sum())


#: Where :func:`fit_temperature` searches (log-spaced grid, then a golden-section refine).
TEMPERATURE_RANGE = (0.05, 100.0)


def fit_temperature(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    bounds: tuple[float, float] = TEMPERATURE_RANGE,
    grid: int = 41,
    steps: int = 40,
) -> float:
    """The T in ``bounds`` minimizing :func:`class_nll` (one scalar, temperature scaling,
    Guo et al. 2017). The NLL is convex in 1/T, so one minimum: a log-spaced grid finds
    its bracket and a golden-section search on log T narrows it."""
    low, high = math.log(bounds[0]), math.log(bounds[1])

    def nll(log_t: float) -> float:
        return class_nll(logits, labels, weights, math.exp(log_t))

    points = [low + (high - low) * i / (grid - 1) for i in range(grid)]
    values = [nll(x) for x in points]
    best = min(range(grid), key=lambda i: (values[i], abs(points[i])))
    a, b = points[max(best - 1, 0)], points[min(best + 1, grid - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    x, fx = (c, fc) if fc <= fd else (d, fd)
    if values[best] < fx:  # the grid's edge point beats the bracket's inside
        x = points[best]
    return math.exp(x)


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
    weights = class_weights(features.labels, n_classes, True) if config.balanced else None
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
            loss = torch.nn.functional.cross_entropy(logits, features.labels[pick], weights)
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


def calibration_split(
    train: LabelledTexts, share: float, seed: int = 0
) -> tuple[LabelledTexts, LabelledTexts] | None:
    """``train`` without, and with only, a seeded ``share`` of each class's texts (at
    least one, never a class's last): texts to fit a temperature on when there is no
    test set. None when some class has fewer than two texts."""
    by_class: dict[str, list[str]] = {}
    for text, label in zip(train.texts, train.labels, strict=True):
        by_class.setdefault(label, []).append(text)
    if min(len(texts) for texts in by_class.values()) < 2:
        return None
    fit: list[tuple[str, str]] = []
    held: list[tuple[str, str]] = []
    for label, texts in sorted(by_class.items()):
        order = list(range(len(texts)))
        random.Random(f"{seed}-calibration-{label}").shuffle(order)
        cut = min(len(texts) - 1, max(1, round(len(texts) * share)))
        held += [(texts[i], label) for i in sorted(order[:cut])]
        fit += [(texts[i], label) for i in sorted(order[cut:])]
    return (
        LabelledTexts(tuple(t for t, _ in fit), tuple(c for _, c in fit)),
        LabelledTexts(tuple(t for t, _ in held), tuple(c for _, c in held)),
    )


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
    ``train`` (class-balanced unless ``config.balanced`` is off) and measured on
    ``test``; its temperature fitted on ``test`` (without one: on a share of ``train``,
    then not trained on; ``config.calibrate``). The figures are kept in its config's
    metrics (``calibration``: T and the held-out NLL before and after)."""
    config = config or TrainConfig()
    classes = tuple(sorted(set(train.labels)))
    if len(classes) < 2:
        raise InvalidInputError(f"{name}: training needs at least two classes, got {classes}")
    if test is not None:
        unknown = sorted(set(test.labels) - set(classes))
        if unknown:
            raise InvalidInputError(f"{name}: test labels {unknown} are not training classes")
    index = {c: n for n, c in enumerate(classes)}
    tok = backbone.tokenizer
    fit, held_texts, held_from = train, test, "test"
    if test is None and config.calibrate:
        split = calibration_split(train, config.calibration_share, config.seed)
        if split is not None:
            (fit, held_texts), held_from = split, "a held-out share of the training texts"

    def features_of(texts: LabelledTexts) -> Features:
        return compute_features(
            backbone,
            encode_texts(tok, texts.texts, config.max_tokens),
            [index[c] for c in texts.labels],
            config.feature_batch,
            progress,
        )

    began = time.perf_counter()
    features = features_of(fit)
    feature_seconds = time.perf_counter() - began
    embeddings = backbone.embeddings.float().cpu()
    began = time.perf_counter()
    head = train_head(features, embeddings, len(classes), config, progress)
    head_seconds = time.perf_counter() - began
    held = features_of(held_texts) if held_texts is not None else None
    temperature, calibration = 1.0, None
    if config.calibrate and held is not None:
        logits = token_logits(head, embeddings, held)
        weights = class_weights(held.labels, len(classes), True) if config.balanced else None
        before = class_nll(logits, held.labels, weights)
        temperature = fit_temperature(logits, held.labels, weights)
        calibration = {
            "temperature": round(temperature, 4),
            "on": held_from,
            "texts": len(held_texts.texts) if held_texts is not None else 0,
            "positions": len(held.labels),
            "weighting": "balanced" if config.balanced else "plain",
            "nll_before": round(before, 4),
            "nll_after": round(class_nll(logits, held.labels, weights, temperature), 4),
        }
    elif config.calibrate:
        calibration = {"temperature": 1.0, "skipped": "no test set and a class of < 2 texts"}
    metrics: dict[str, Any] = {
        "train_texts": len(fit.texts),
        "train_positions": len(features.next_ids),
        "feature_seconds": round(feature_seconds, 1),
        "head_seconds": round(head_seconds, 1),
        "train": evaluate(head, embeddings, features, temperature),
        "settings": config.to_dict(),
        **({"calibration": calibration} if calibration is not None else {}),
        **(extra_metrics or {}),
    }
    if test is not None and held is not None:
        measured = evaluate(head, embeddings, held, temperature)
        metrics["test"] = {"texts": len(test.texts), **measured}
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
        temperature=temperature,
    )
    return GuidanceClassifier(cfg, head.to(backbone.device), backbone)
