"""Methods and controls of the benchmark, as small composable objects.

Every method turns a batch of queries into completions. Most are a prompt (with
or without in-context items) plus, per row, a steering vector per site; they are
all one :class:`SteeredPrompt` with a :class:`MethodSpec`. Other kinds (PEFT,
classifier-guided decoding) register their own factory in :data:`REGISTRY`.

Vectors are extracted once per (user, method) at every benchmark site
(:class:`fints.benchmark.banks.UserBank`) and subsets of sites are chosen at steer time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Literal, Protocol

import torch

from fints.backends import TransformersBackend
from fints.benchmark.banks import BenchContext, Contrast
from fints.benchmark.labels import Kind, Role, Source
from fints.benchmark.tasks import Query
from fints.errors import InvalidInputError
from fints.generation import Completion, GenerationOptions
from fints.history import HistoryItem
from fints.modes import SteeringAddition
from fints.plan import SteeringPlan, plan_steering
from fints.prompts import build_prompt_ids
from fints.retrieval import nearest_items
from fints.sites import Component, Site, parse_sites
from fints.steering import Aggregation, SteeringConfig
from fints.target_nll import target_nll
from fints.user_vectors import UserVectorMethod

SourceName = Literal["own", "wrong", "random", "others"]  # the values of labels.Source
KindName = Literal["none", "icl", "vector", "fints"]  # the values of labels.Kind

#: The kinds that steer (they name sites and draw vectors from the user's bank).
STEERING_KINDS = (Kind.VECTOR, Kind.FINTS)

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
      a random direction of the same norm per site (``"random"``), or the mean of the
      other users' vectors (``"others"``: for trained vectors, the shared part).
    * ``centered``: the steering vector minus the mean difference of the other
      users (all but the query's user and its wrong-user control's user, so the
      centered own and wrong-user rows subtract the same vector), which removes
      the direction every user shares and keeps what is specific to one.
    * ``strength`` is the same for every steered site; with ``relative`` it is
      a fraction of the site's typical activation norm.
    """

    label: str
    kind: KindName = Kind.NONE
    icl_k: int = 0
    icl_source: SourceName = Source.OWN
    sites: str = ""
    strength: float = 0.0
    relative: bool = True
    top_k: int = 5
    aggregation: Aggregation = "attentive"
    tau: float = DEFAULT_TAU
    contrast: Contrast = "context"
    vector_source: SourceName = Source.OWN
    user_vector: UserVectorMethod = "mean"
    centered: bool = False
    role: str = Role.METHOD  # a Role (for the report)

    def __post_init__(self) -> None:
        if self.kind not in (Kind.NONE, Kind.ICL, Kind.VECTOR, Kind.FINTS):
            raise InvalidInputError(f"unknown method kind {self.kind!r}")
        if self.kind in STEERING_KINDS and not self.sites:
            raise InvalidInputError(f"method {self.label!r} steers but names no sites")
        if self.icl_source not in (Source.OWN, Source.WRONG):
            raise InvalidInputError("icl_source must be 'own' or 'wrong'")
        if self.centered and self.kind not in STEERING_KINDS:
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
        if self.kind not in STEERING_KINDS:
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
        return self.kind == Kind.FINTS and self.aggregation == "attentive" and self.top_k != 1

    def describe(self) -> str:
        parts = []
        if self.icl_k:
            parts.append(
                f"icl k={self.icl_k}" + (" (wrong user)" if self.icl_source == Source.WRONG else "")
            )
        if self.kind == Kind.FINTS:
            k = "all" if self.top_k == ALL_ENTRIES else self.top_k
            tau = f" tau={self.tau:g}" if self.weighs_by_score and self.tau != DEFAULT_TAU else ""
            parts.append(
                f"fints {self.sites} s={self.strength:g}{'rel' if self.relative else 'abs'} "
                f"K={k} {self.aggregation}{tau} {self.contrast}"
            )
        elif self.kind == Kind.VECTOR:
            parts.append(
                f"user vector ({self.user_vector}) {self.sites} "
                f"s={self.strength:g}{'rel' if self.relative else 'abs'} {self.contrast}"
            )
        if self.centered:
            parts.append("centered")
        if self.kind in STEERING_KINDS and self.vector_source != Source.OWN:
            parts.append(f"[{self.vector_source} vectors]")
        return ", ".join(parts) or "no personalization"


class Method(Protocol):
    """What the runner needs from a method: a stable key and batched generation."""

    label: str
    role: str

    def key(self) -> str: ...

    def describe(self) -> str: ...

    def generate(
        self, queries: Sequence[Query], ctx: BenchContext, options: GenerationOptions
    ) -> list[Completion]: ...

    def nll(self, queries: Sequence[Query], ctx: BenchContext, batch_size: int) -> list[float]:
        """Per query: the per-token NLL of its reference (and end of turn), teacher-forced
        on exactly what :meth:`generate` decodes from."""
        ...


def target_ids(ctx: BenchContext, reference: str) -> list[int]:
    """The gold output as the model should produce it: its tokens, then end of turn."""
    tok = ctx.model.tokenizer
    return [*tok(reference, add_special_tokens=False)["input_ids"], tok.eos_token_id]


def added_vectors(additions: Sequence[SteeringAddition]) -> dict[Site, torch.Tensor] | None:
    """What the additions' hooks add at each site (summed where several name it)."""
    out: dict[Site, torch.Tensor] = {}
    for addition in additions:
        for site, v in addition.vectors.items():
            out[site] = out[site] + v if site in out else v
    return out or None


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
        return (
            ctx.task.wrong_user(query.user)
            if self.spec.vector_source == Source.WRONG
            else query.user
        )

    def prompts(self, queries: Sequence[Query], ctx: BenchContext) -> list[list[int]]:
        spec = self.spec
        contexts: list[list[HistoryItem]] = [[] for _ in queries]
        if spec.icl_k:
            keys = ctx.query_keys(queries)
            for row, query in enumerate(queries):
                user = (
                    query.user if spec.icl_source == Source.OWN else ctx.task.wrong_user(query.user)
                )
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
        if spec.kind not in STEERING_KINDS:
            return None
        banks = [ctx.bank(self._vector_user(q, ctx), spec.contrast) for q in queries]
        if spec.kind == Kind.FINTS:
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
        if spec.vector_source == Source.RANDOM:
            plan = plan.randomized([f"{ctx.seed}:random:{q.qid}" for q in queries])
        if spec.vector_source == Source.OTHERS:  # what is left without the user's own part
            others = [ctx.shared_direction({q.user}, spec.contrast, sites) for q in queries]
            mask = torch.tensor(plan.steered, dtype=torch.float32).view(-1, 1, 1)
            plan = plan.with_aggregated(mask * torch.stack(others).float())
        return plan

    def vectors(self, queries: Sequence[Query], ctx: BenchContext) -> dict[Site, torch.Tensor]:
        plan = self.plan(queries, ctx)
        return plan.vectors() if plan is not None else {}

    def inputs(
        self, queries: Sequence[Query], ctx: BenchContext
    ) -> tuple[list[list[int]], list[SteeringAddition]]:
        """The prompt ids and the steering additions the queries are decoded with (and
        their targets scored with: one path for both)."""
        plan = self.plan(queries, ctx)
        additions = [SteeringAddition.of(plan)] if plan is not None and plan.sites else []
        return self.prompts(queries, ctx), additions

    def generate(
        self, queries: Sequence[Query], ctx: BenchContext, options: GenerationOptions
    ) -> list[Completion]:
        prompts, additions = self.inputs(queries, ctx)
        return TransformersBackend(ctx.model).decode(prompts, additions, options)

    def nll(self, queries: Sequence[Query], ctx: BenchContext, batch_size: int) -> list[float]:
        prompts, additions = self.inputs(queries, ctx)
        targets = [target_ids(ctx, q.reference) for q in queries]
        vectors = added_vectors(additions)
        return target_nll(ctx.model, prompts, targets, vectors, batch_size=batch_size).tolist()


MethodFactory = Callable[[MethodSpec], Method]

#: Method kinds by name. Later issues add e.g. "peft" or "classifier-guided" here.
REGISTRY: dict[str, MethodFactory] = {
    Kind.NONE: SteeredPrompt,
    Kind.ICL: SteeredPrompt,
    Kind.VECTOR: SteeredPrompt,
    Kind.FINTS: SteeredPrompt,
}


def make_method(spec: MethodSpec) -> Method:
    if spec.kind not in REGISTRY:
        raise InvalidInputError(f"no method registered for kind {spec.kind!r}: {sorted(REGISTRY)}")
    return REGISTRY[spec.kind](spec)
