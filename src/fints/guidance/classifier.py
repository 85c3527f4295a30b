"""A preference classifier: a frozen causal-LM backbone (its first ``layers`` decoder
layers) and a head giving, from the hidden state of a prefix, class logits for every
candidate next token at once.

The head is CLIPer's linear map hidden -> vocab x classes, factored through the
backbone's own (frozen) token embeddings E so that it stays small:

    logit(v, c | h) = (U_c h) . E_v + a_c . h + b_c

(``U``: classes x hidden x hidden, ``a``: classes x hidden). A full hidden x (vocab x
classes) matrix would be 255M numbers for 9 classes on SmolLM2's 49,152 tokens, more
than the backbone. Saved as ``head.safetensors`` + ``classifier.json`` in a folder.

The class probabilities are ``softmax(logit / T)`` with the config's ``temperature`` T,
fitted after training on held-out texts (1: as trained; files from before it load so).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fints.errors import FintsError, InvalidInputError
from fints.layers import LayerPaths, resolve_layout
from fints.models import LoadedModel

CONFIG_FILE, HEAD_FILE = "classifier.json", "head.safetensors"
FORMAT = 1


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identify a tokenizer by its vocabulary (token -> id) and special tokens."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything but the head's weights; ``classifier.json``."""

    name: str  # the preference dimension, e.g. "mood"
    classes: tuple[str, ...]
    backbone: str  # what fints.models.load_model loads, e.g. "smollm2"
    backbone_fingerprint: str
    tokenizer_fingerprint: str
    layers: int  # backbone decoder layers used
    hidden_size: int
    lead_ids: tuple[int, ...]  # what the classifier reads before the first new token
    metrics: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0  # class logits are divided by it (fitted on held-out texts)
    format: int = FORMAT

    def __post_init__(self) -> None:
        if len(self.classes) < 2 or len(set(self.classes)) != len(self.classes):
            raise InvalidInputError(f"a classifier needs >= 2 distinct classes: {self.classes}")
        if self.layers < 1:
            raise InvalidInputError(f"a classifier needs layers >= 1, got {self.layers}")
        if not self.lead_ids:
            raise InvalidInputError("a classifier needs lead_ids: at least one lead token")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t <= 0:
            raise InvalidInputError(
                f"a classifier's temperature must be a finite number > 0, got {t!r}",
                param="temperature",
            )

    @property
    def backbone_key(self) -> tuple[str, int]:
        """Classifiers with equal keys share one backbone and one forward pass per step."""
        return self.backbone_fingerprint, self.layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        """A config read from ``classifier.json``: a missing, unknown or mistyped field is
        an :class:`InvalidInputError` naming it."""
        if not isinstance(data, dict):
            raise InvalidInputError(f"a classifier config must be a JSON object, got {data!r}")
        fmt = data.get("format")
        if isinstance(fmt, bool) or fmt != FORMAT:
            raise FintsError(f"unsupported classifier format {fmt!r}")
        known = {f.name: f for f in fields(cls)}
        missing = sorted(n for n, f in known.items() if n not in data and _required(f))
        unknown = sorted(set(data) - set(known))
        if missing or unknown:
            raise InvalidInputError(
                f"classifier config: missing field(s) {missing}, unknown field(s) {unknown}",
                param=(missing or unknown)[0],
            )
        types = {
            "name": str, "backbone": str, "backbone_fingerprint": str,
            "tokenizer_fingerprint": str, "layers": int, "hidden_size": int, "metrics": dict,
        }  # fmt: skip
        for name, kind in types.items():
            value = data.get(name, {} if kind is dict else None)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise InvalidInputError(
                    f"classifier config: {name} must be a {kind.__name__}, got {value!r}",
                    param=name,
                )
        for name, kind in (("classes", str), ("lead_ids", int)):
            value = data[name]
            if not isinstance(value, list | tuple) or not all(
                isinstance(v, kind) and not isinstance(v, bool) for v in value
            ):
                raise InvalidInputError(
                    f"classifier config: {name} must be a list of {kind.__name__}, got {value!r}",
                    param=name,
                )
        data = {**data, "classes": tuple(data["classes"]), "lead_ids": tuple(data["lead_ids"])}
        if "temperature" in data:
            t = data["temperature"]
            if isinstance(t, bool) or not isinstance(t, int | float):
                raise InvalidInputError(
                    f"classifier config: temperature must be a number, got {t!r}",
                    param="temperature",
                )
            data["temperature"] = float(t)
        return cls(**data)


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


class GuidanceHead(nn.Module):
    """``logit(v, c | h) = (U_c h) . E_v + a_c . h + b_c`` (see the module docstring)."""

    def __init__(self, hidden: int, classes: int) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(classes, hidden, hidden))
        self.prior = nn.Linear(hidden, classes)

    def full(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """``[rows, hidden]`` -> class logits ``[rows, vocab, classes]``."""
        query = torch.einsum("bh,cgh->bcg", hidden, self.mix)
        return torch.einsum("bcg,vg->bvc", query, embeddings) + self.prior(hidden)[:, None, :]

    def candidates(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """``[rows, hidden]`` and the candidates' embeddings ``[rows, k, hidden]`` -> class
        logits ``[rows, k, classes]``."""
        query = torch.einsum("bh,cgh->bcg", hidden, self.mix)
        return torch.einsum("bcg,bkg->bkc", query, embedded) + self.prior(hidden)[:, None, :]


class Backbone:
    """The first ``layers`` decoder layers of a frozen causal LM (its own copy: steering
    hooks on the generator never reach it), run incrementally with a KV cache."""

    def __init__(
        self,
        loaded: LoadedModel,
        layers: int,
        paths: LayerPaths | None = None,
        *,
        owned: bool = False,  # True: ``loaded`` is this backbone's alone (no copy made)
    ) -> None:
        model = loaded.model if owned else copy.deepcopy(loaded.model)
        found = resolve_layout(model, paths).layers
        if not 1 <= layers <= len(found):
            raise InvalidInputError(f"layers must be in 1..{len(found)}, got {layers}")
        decoder = model.get_decoder()
        keep = nn.ModuleList(found[:layers])
        for name, child in decoder.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == len(found):
                setattr(decoder, name, keep)
        config = decoder.config
        config.num_hidden_layers = layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:layers]
        model.requires_grad_(False)
        self.decoder = decoder.eval()
        # transformers >= 5.20 calls the KV cache ``cache``, earlier ``past_key_values``
        known = inspect.signature(decoder.forward).parameters
        self._cache_name = "cache" if "cache" in known else "past_key_values"
        table: Any = model.get_input_embeddings().weight
        self.embeddings: torch.Tensor = table.detach()  # [vocab, hidden]
        self.layers = layers
        self.fingerprint = loaded.fingerprint
        self.tokenizer_fingerprint = tokenizer_fingerprint(loaded.tokenizer)
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name

    @property
    def key(self) -> tuple[str, int]:
        return self.fingerprint, self.layers

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
    ) -> tuple[torch.Tensor, Any]:
        """Hidden states ``[batch, seq, hidden]`` (after the final norm) and the new cache."""
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            **{self._cache_name: cache},
        )
        return out.last_hidden_state.float(), getattr(out, self._cache_name)


class GuidanceClassifier:
    """A head on a backbone: ``p(class | prefix, v)`` for candidate tokens ``v``."""

    def __init__(self, config: ClassifierConfig, head: GuidanceHead, backbone: Backbone) -> None:
        if backbone.key != config.backbone_key:
            raise InvalidInputError(
                f"classifier {config.name!r} was trained on backbone "
                f"{config.backbone_fingerprint[:12]} ({config.layers} layers), "
                f"got {backbone.fingerprint[:12]} ({backbone.layers} layers)"
            )
        self.config, self.head, self.backbone = config, head.eval(), backbone
        self.embeddings = backbone.embeddings.float()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def classes(self) -> tuple[str, ...]:
        return self.config.classes

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Refuse a generator whose tokenizer is not the one this classifier reads."""
        theirs = tokenizer_fingerprint(tokenizer)
        if theirs != self.config.tokenizer_fingerprint:
            raise InvalidInputError(
                f"classifier {self.name!r} was trained for another tokenizer "
                f"({self.config.tokenizer_fingerprint[:12]}, backbone {self.config.backbone!r}) "
                f"than the generator's ({theirs[:12]}): guidance needs the same vocabulary",
                param="preferences",
            )

    @property
    def temperature(self) -> float:
        return self.config.temperature

    def log_probs_full(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[rows, hidden]`` -> ``log p(c | prefix, v)`` ``[rows, vocab, classes]``
        (the head's logits divided by the temperature)."""
        return (self.head.full(hidden, self.embeddings) / self.temperature).log_softmax(-1)

    def log_probs_candidates(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[rows, hidden]`` and candidate ids ``[rows, k]`` -> ``[rows, k, classes]``."""
        logits = self.head.candidates(hidden, self.embeddings[ids])
        return (logits / self.temperature).log_softmax(-1)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(state, str(folder / HEAD_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=1) + "\n")
        return folder


def read_config(folder: str | Path) -> ClassifierConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FintsError(f"{folder} holds no classifier ({CONFIG_FILE} is missing)")
    return ClassifierConfig.from_dict(json.loads(path.read_text()))


def load_classifier(folder: str | Path, backbone: Backbone) -> GuidanceClassifier:
    config = read_config(folder)
    head = GuidanceHead(config.hidden_size, len(config.classes))
    head.load_state_dict(load_file(str(Path(folder) / HEAD_FILE)))
    return GuidanceClassifier(config, head.to(backbone.device), backbone)
