"""Methods and controls of the benchmark, as small composable objects.

Every method turns a batch of queries into completions. Most are a prompt (with
or without in-context items) plus, per row, a steering vector per site; they are
all one :class:`SteeredPrompt` with a :class:`MethodSpec`. Other kinds (PEFT,
classifier-guided decoding) register their own factory in :data:`REGISTRY`.

Vectors are extracted once per (user, contrast) at every benchmark site
(:class:`VectorBank`) and subsets of sites are chosen at steer time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

import torch

from fints.benchmark.labels import Label, Role
from fints.benchmark.tasks import Query, Task
from fints.dictionary import DictionaryMeta, UserDictionary
from fints.encoders import KeyEncoder
from fints.errors import InvalidInputError
from fints.extraction import ExtractionConfig, Extractor
from fints.generation import Completion, GenerationOptions, generate_batch
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.plan import SteeringPlan, plan_steering
from fints.prompts import build_prompt_ids, get_template
from fints.retrieval import nearest_items
from fints.sites import Component, Site, parse_sites
from fints.steering import Aggregation, SteeringConfig
from fints.user_vectors import UserVectorMethod, user_vector

Source = Literal["own", "wrong", "random"]
Contrast = str  # an extraction method's name (fints.extraction.METHODS)
Kind = Literal["none", "icl", "vector", "fints"]

#: ``MethodSpec.top_k`` that retrieves the whole dictionary: with mean aggregation, the
#: mean of all the user's differences (the "user vector (mean)" reached by retrieval).
ALL_ENTRIES = 0
#: The attentive softmax temperature unless a spec names another (left out of descriptions).
DEFAULT_TAU = 0.1

#: What centering subtracts (part of a centered method's cache key): the mean over the
#: users other than the query's user and its wrong-user control's user.
CENTERING = "mean of users but the query's and its wrong user's"


@dataclass(frozen=True)
class MethodSpec:
    """Everything that defines a prompt+steering method (its cache key, too).

    * ``icl_k`` items of the user's own history (``icl_source="own"``) or of
      another user's (``"wrong"``) are put into the prompt.
    * ``kind="fints"``: per query, top-``top_k`` entries of the dictionary are
      retrieved (``ALL_ENTRIES``: all of them) and aggregated (``aggregation``, with
      the softmax temperature ``tau`` when attentive); ``kind="vector"``: one
      user-level vector (``user_vector`` = mean / pca / logistic).
    * ``vector_source``: the user's own vectors, another user's (``"wrong"``),
      or a random direction of the same norm per site (``"random"``).
    * ``centered``: the steering vector minus the mean difference of the other
      users (all but the query's user and its wrong-user control's user, so the
      centered own and wrong-user rows subtract the same vector), which removes
      the direction every user shares and keeps what is specific to one.
    * ``strength`` is the same for every steered site; with ``relative`` it is
      a fraction of the site's typical activation norm.
    """

    label: str
    kind: Kind = "none"
    icl_k: int = 0
    icl_source: Source = "own"
    sites: str = ""
    strength: float = 0.0
    relative: bool = True
    top_k: int = 5
    aggregation: Aggregation = "attentive"
    tau: float = DEFAULT_TAU
    contrast: Contrast = "context"
    vector_source: Source = "own"
    user_vector: UserVectorMethod = "mean"
    centered: bool = False
    role: str = Role.METHOD  # a Role (for the report)

    def __post_init__(self) -> None:
        if self.kind not in ("none", "icl", "vector", "fints"):
            raise InvalidInputError(f"unknown method kind {self.kind!r}")
        if self.kind in ("vector", "fints") and not self.sites:
            raise InvalidInputError(f"method {self.label!r} steers but names no sites")
        if self.icl_source == "random":
            raise InvalidInputError("icl_source must be 'own' or 'wrong'")
        if self.centered and self.kind not in ("vector", "fints"):
            raise InvalidInputError(f"method {self.label!r} is centered but does not steer")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k must be >= 1 (or {ALL_ENTRIES}: all), got {self.top_k}")
        if not self.tau > 0:
            raise InvalidInputError(f"tau must be > 0, got {self.tau}")

    def key(self) -> str:
        """A short hash of the fields that can change the output (not the label or role)."""
        fields = asdict(self)
        fields.pop("label")
        fields.pop("role")
        if self.centered:
            fields["centered"] = CENTERING  # a new definition must not reuse old generations
        else:
            fields.pop("centered")  # keeps the keys (and caches) of runs made before it existed
        if not self.weighs_by_score:
            fields["tau"] = DEFAULT_TAU  # a moot tau must not make the same setting generate twice
        if self.kind not in ("vector", "fints"):
            for name in ("sites", "strength", "relative", "top_k", "aggregation", "tau"):
                fields.pop(name)
            for name in ("contrast", "vector_source", "user_vector"):
                fields.pop(name)
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_(self, **changes: object) -> MethodSpec:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def weighs_by_score(self) -> bool:
        """Whether ``tau`` changes anything: attentive aggregation of more than one entry."""
        return self.kind == "fints" and self.aggregation == "attentive" and self.top_k != 1

    def describe(self) -> str:
        parts = []
        if self.icl_k:
            parts.append(
                f"icl k={self.icl_k}" + (" (wrong user)" if self.icl_source == "wrong" else "")
            )
        if self.kind == "fints":
            k = "all" if self.top_k == ALL_ENTRIES else self.top_k
            tau = f" tau={self.tau:g}" if self.weighs_by_score and self.tau != DEFAULT_TAU else ""
            parts.append(
                f"fints {self.sites} s={self.strength:g}{'rel' if self.relative else 'abs'} "
                f"K={k} {self.aggregation}{tau} {self.contrast}"
            )
        elif self.kind == "vector":
            parts.append(
                f"user vector ({self.user_vector}) {self.sites} "
                f"s={self.strength:g}{'rel' if self.relative else 'abs'} {self.contrast}"
            )
        if self.centered:
            parts.append("centered")
        if self.kind in ("fints", "vector") and self.vector_source != "own":
            parts.append(f"[{self.vector_source} vectors]")
        return ", ".join(parts) or "no personalization"


@dataclass
class UserBank:
    """One user's per-item activations at every benchmark site, for one contrast."""

    user: str
    sites: tuple[Site, ...]
    item_ids: list[str]
    keys: torch.Tensor  # [N, key_dim]
    positive: torch.Tensor  # [N, sites, hidden]
    negative: torch.Tensor
    site_norms: torch.Tensor  # [sites]
    meta: DictionaryMeta
    _dicts: dict[tuple[Site, ...], UserDictionary] = field(default_factory=dict)
    _user_vectors: dict[tuple[tuple[Site, ...], str], UserDictionary] = field(default_factory=dict)

    @property
    def differences(self) -> torch.Tensor:
        return self.positive - self.negative

    def index(self, sites: Sequence[Site]) -> list[int]:
        missing = [str(s) for s in sites if s not in self.sites]
        if missing:
            raise InvalidInputError(
                f"sites {missing} were not extracted (extracted: {[str(s) for s in self.sites]})"
            )
        return [self.sites.index(s) for s in sites]

    def dictionary(self, sites: tuple[Site, ...]) -> UserDictionary:
        if sites not in self._dicts:
            idx = self.index(sites)
            meta = replace(
                self.meta,
                sites=sites,
                site_norms=tuple(float(self.site_norms[i]) for i in idx),
            )
            self._dicts[sites] = UserDictionary(
                self.user, meta, list(self.item_ids), self.keys, self.differences[:, idx]
            )
        return self._dicts[sites]

    def user_dictionary(self, sites: tuple[Site, ...], method: UserVectorMethod) -> UserDictionary:
        """The user-level vector as a dictionary of one entry (retrieval returns it as is)."""
        key = (sites, method)
        if key not in self._user_vectors:
            idx = self.index(sites)
            vector = user_vector(self.positive[:, idx], self.negative[:, idx], method)
            whole = self.dictionary(sites)
            self._user_vectors[key] = UserDictionary(
                self.user,
                whole.meta,
                [Label.user_vector(method)],
                torch.nn.functional.normalize(self.keys.mean(dim=0, keepdim=True), dim=-1),
                vector.unsqueeze(0),
            )
        return self._user_vectors[key]


class BenchContext:
    """One model, one task: query keys, history keys and vector banks, cached."""

    def __init__(
        self,
        model: LoadedModel,
        encoder: KeyEncoder,
        task: Task,
        sites: tuple[Site, ...],
        cache_dir: Path,
        *,
        extraction_batch: int = 8,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        self.model, self.encoder, self.task, self.sites = model, encoder, task, sites
        self.template = get_template(task.template)
        self.cache_dir = cache_dir
        self.extraction_batch = extraction_batch
        self.seed = seed
        self.progress = progress
        self._query_keys: dict[str, torch.Tensor] = {}
        self._history_keys: dict[str, torch.Tensor] = {}
        self._banks: dict[tuple[str, str], UserBank] = {}
        self._mean_differences: dict[str, dict[str, torch.Tensor]] = {}
        self.extraction_seconds = 0.0

    def query_keys(self, queries: Sequence[Query]) -> torch.Tensor:
        missing = [q for q in queries if q.qid not in self._query_keys]
        if missing:
            keys = self.encoder.encode([q.input for q in missing])
            for q, k in zip(missing, keys, strict=True):
                self._query_keys[q.qid] = k
        return torch.stack([self._query_keys[q.qid] for q in queries])

    def history_keys(self, user: str) -> torch.Tensor:
        if user not in self._history_keys:
            history = self.task.users[user].history
            self._history_keys[user] = self.encoder.encode([i.input for i in history])
        return self._history_keys[user]

    def _bank_path(self, user: str, contrast: str) -> Path:
        history = self.task.users[user].history
        payload = json.dumps(
            [
                self.model.fingerprint,
                str(self.model.dtype),
                self.task.name,
                self.task.sha256,
                user,
                contrast,
                [str(s) for s in self.sites],
                [i.item_id for i in history],
                self.seed,
                self.encoder.name,
            ]
        )
        digest = hashlib.sha256(payload.encode()).hexdigest()[:24]
        return self.cache_dir / "banks" / f"{digest}.pt"

    def bank(self, user: str, contrast: Contrast) -> UserBank:
        """The user's activations at every site (extracted once, cached on disk)."""
        key = (user, contrast)
        if key in self._banks:
            return self._banks[key]
        path = self._bank_path(user, contrast)
        if path.is_file():
            data = torch.load(path, weights_only=False)
            bank = UserBank(
                user,
                self.sites,
                data["item_ids"],
                data["keys"],
                data["positive"],
                data["negative"],
                data["site_norms"],
                DictionaryMeta.from_json(data["meta"]),
            )
        else:
            bank = self._extract(user, contrast)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(
                {
                    "item_ids": bank.item_ids,
                    "keys": bank.keys,
                    "positive": bank.positive,
                    "negative": bank.negative,
                    "site_norms": bank.site_norms,
                    "meta": bank.meta.to_json(),
                },
                tmp,
            )
            tmp.replace(path)
        self._banks[key] = bank
        return bank

    def shared_direction(
        self, exclude: Collection[str], contrast: Contrast, sites: Sequence[Site]
    ) -> torch.Tensor:
        """The mean difference of the users not in ``exclude`` at ``sites``: ``[sites, hidden]``.

        Each user's mean over their items counts once, so a long history does not
        dominate. It needs every user's bank (extracted on first use).
        """
        if contrast not in self._mean_differences:
            self._mean_differences[contrast] = {
                u: self.bank(u, contrast).differences.float().mean(dim=0) for u in self.task.users
            }
        others = [m for u, m in self._mean_differences[contrast].items() if u not in exclude]
        if not others:
            raise InvalidInputError(f"centering needs users besides {sorted(exclude)}")
        idx = self.bank(next(iter(self.task.users)), contrast).index(sites)
        return torch.stack(others).mean(dim=0)[idx]

    def _extract(self, user: str, contrast: Contrast) -> UserBank:
        import time

        history = self.task.users[user].history
        config = ExtractionConfig(
            sites=self.sites,
            method=contrast,
            params=(
                {"rouge_threshold": 0.15 if self.task.name == "headlines" else 0.2}
                if contrast == "response"
                else None
            ),
            batch_size=self.extraction_batch,
            seed=self.seed,
        )
        extractor = Extractor(self.model, self.encoder, self.template, config)
        start = time.perf_counter()
        result = extractor.extract(
            history, history, self.task.negatives_for(user), progress=self.progress
        )
        self.extraction_seconds += time.perf_counter() - start
        if not result.entries:
            # Every pair was filtered out (response contrast): fall back to zero vectors.
            hidden = self.model.hidden_size
            zeros = torch.zeros(1, len(self.sites), hidden)
            keys = self.encoder.encode([history[-1].input])
            return UserBank(
                user, self.sites, [history[-1].item_id], keys, zeros, zeros,
                torch.ones(len(self.sites)), result.meta,
            )  # fmt: skip
        keys = torch.stack([e.key for e in result.entries])
        return UserBank(
            user,
            self.sites,
            [e.item_id for e in result.entries],
            keys,
            result.positive,
            result.negative,
            torch.tensor(result.meta.site_norms, dtype=torch.float32),
            result.meta,
        )


class Method(Protocol):
    """What the runner needs from a method: a stable key and batched generation."""

    label: str
    role: str

    def key(self) -> str: ...

    def describe(self) -> str: ...

    def generate(
        self, queries: Sequence[Query], ctx: BenchContext, options: GenerationOptions
    ) -> list[Completion]: ...


class SteeredPrompt:
    """A prompt (optionally with in-context items) plus optional per-row steering.

    It runs the engine's own steps: :func:`fints.retrieval.nearest_items` for the
    in-context items, :func:`fints.prompts.build_prompt_ids`, :func:`fints.plan.plan_steering`
    (controls transform the plan), and :func:`fints.generation.generate_batch`.
    """

    def __init__(self, spec: MethodSpec) -> None:
        self.spec = spec
        self.label = spec.label
        self.role = spec.role
        self._sites = parse_sites(spec.sites) if spec.sites else ()

    def key(self) -> str:
        return self.spec.key()

    def describe(self) -> str:
        return self.spec.describe()

    def _vector_user(self, query: Query, ctx: BenchContext) -> str:
        return ctx.task.wrong_user(query.user) if self.spec.vector_source == "wrong" else query.user

    def prompts(self, queries: Sequence[Query], ctx: BenchContext) -> list[list[int]]:
        spec = self.spec
        contexts: list[list[HistoryItem]] = [[] for _ in queries]
        if spec.icl_k:
            keys = ctx.query_keys(queries)
            for row, query in enumerate(queries):
                user = query.user if spec.icl_source == "own" else ctx.task.wrong_user(query.user)
                history = ctx.task.users[user].history
                contexts[row] = nearest_items(
                    ctx.history_keys(user), history, keys[row], spec.icl_k
                )
        tok = ctx.model.tokenizer
        return [
            build_prompt_ids(tok, ctx.template, q.input, c)
            for q, c in zip(queries, contexts, strict=True)
        ]

    def steering_config(self) -> SteeringConfig:
        """The engine's settings this method steers with (the top-K of ``ALL_ENTRIES`` is
        resolved per batch)."""
        spec = self.spec
        return SteeringConfig(
            sites=self._sites,
            strengths={c: spec.strength for c in Component},
            relative=spec.relative,
            top_k=max(spec.top_k, 1),
            aggregation=spec.aggregation,
            tau=spec.tau,
        )

    def plan(self, queries: Sequence[Query], ctx: BenchContext) -> SteeringPlan | None:
        """The engine's steering plan for these queries, with this method's controls."""
        spec, sites = self.spec, self._sites
        if spec.kind not in ("vector", "fints"):
            return None
        banks = [ctx.bank(self._vector_user(q, ctx), spec.contrast) for q in queries]
        if spec.kind == "fints":
            dictionaries = [b.dictionary(sites) for b in banks]
        else:  # one user-level vector: a dictionary of one entry
            dictionaries = [b.user_dictionary(sites, spec.user_vector) for b in banks]
        config = self.steering_config()
        if spec.top_k == ALL_ENTRIES:
            config = config.with_(top_k=max(len(d) for d in dictionaries))
        keys = list(ctx.query_keys(queries))
        plan = plan_steering(dictionaries, keys, [config] * len(queries))
        if spec.centered:
            # The same vector for the own and the wrong-user row of a query, so the two
            # stay a controlled pair.
            shared = [
                ctx.shared_direction({q.user, ctx.task.wrong_user(q.user)}, spec.contrast, sites)
                for q in queries
            ]
            plan = plan.shifted(-torch.stack(shared))
        if spec.vector_source == "random":
            plan = plan.randomized([f"{ctx.seed}:random:{q.qid}" for q in queries])
        return plan

    def vectors(self, queries: Sequence[Query], ctx: BenchContext) -> dict[Site, torch.Tensor]:
        plan = self.plan(queries, ctx)
        return plan.vectors() if plan is not None else {}

    def generate(
        self, queries: Sequence[Query], ctx: BenchContext, options: GenerationOptions
    ) -> list[Completion]:
        prompts = self.prompts(queries, ctx)
        vectors = self.vectors(queries, ctx)
        return generate_batch(ctx.model, prompts, vectors or None, options)


MethodFactory = Callable[[MethodSpec], Method]

#: Method kinds by name. Later issues add e.g. "peft" or "classifier-guided" here.
REGISTRY: dict[str, MethodFactory] = {
    "none": SteeredPrompt,
    "icl": SteeredPrompt,
    "vector": SteeredPrompt,
    "fints": SteeredPrompt,
}


def make_method(spec: MethodSpec) -> Method:
    if spec.kind not in REGISTRY:
        raise InvalidInputError(f"no method registered for kind {spec.kind!r}: {sorted(REGISTRY)}")
    return REGISTRY[spec.kind](spec)


def benchmark_sites(num_layers: int, layers: Sequence[int] | None = None) -> tuple[Site, ...]:
    """attn, mlp and block at each layer (default: at 1/3, 1/2 and 2/3 of the depth)."""
    chosen = (
        sorted(set(layers))
        if layers
        else sorted({num_layers // 3, num_layers // 2, 2 * num_layers // 3})
    )
    bad = [layer for layer in chosen if not 0 <= layer < num_layers]
    if bad:
        raise InvalidInputError(f"layers {bad} out of range for a {num_layers}-layer model")
    return parse_sites(",".join(f"{layer}.attn+mlp+block" for layer in chosen))
