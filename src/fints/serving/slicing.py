"""Step-level scheduling of the model worker: fair rounds across tenants, long rows in slices.

The worker decodes in *rounds*. A round's rows are picked by :func:`pick_fair`: one row
of each tenant in turn, the tenant that has waited longest first, and while two or more
tenants share the server (*contention*: rows of several tenants wait, or had rows in a
round of the last ``RECENT_S`` seconds, 10 s: a client just answered is likely to be back)
a tenant gets at most ``max(1, max_batch_size // tenants)`` rows of a
round. A long row (a request for more than twice ``slice_tokens`` new tokens) decodes at
most ``slice_tokens`` per round, under contention and, while the server keeps decoding
states (below; the default), also when a tenant is alone; a row that is not done goes back
to the queue with the tokens it has (:class:`Row`), behind the requests that came
meanwhile. So a short request waits for one slice of a long one, not for all of it, even
when it comes after a quiet spell (and a request of two slices or less decodes whole:
splitting it would cost it a round).

A row goes on from where its last slice stopped: the slice's decoding state (its ids and
the model's key/value cache, :class:`~fints.decode_state.DecodeState`) is kept with the
row while it waits, so the next slice reads only its new tokens. Where none is kept (the
server's budget for kept caches is spent, the row's group was split across rounds, or the
backend keeps none), the row's prompt plus its generated tokens are decoded from the
start: the same computation (the model sees the same ids at every position; steering
vectors are added at every position alike), so a greedy row's tokens are the same sliced
or not either way (tested in float32; in bfloat16 a recomputed prefix can differ in the
last bits, as batching can).
Rows whose output would change are never sliced: sampled rows with a seed (a new slice
would draw other random numbers) and rows with any addition other than steering vectors
(classifier guidance keeps state over the generated tokens; LoRA adapters untested).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fints.backends import Backend
from fints.decode_state import DecodeState, KvCarry
from fints.engine import PreparedBatch
from fints.generation import Completion, GenerationOptions, completion_text
from fints.modes import SteeringAddition
from fints.serving.jobs import GenerationJob
from fints.serving.streaming import IncrementalDecoder
from fints.stopping import StopSequences

Item = TypeVar("Item")


@dataclass
class Row:
    """One request's row from its prepare to its answer: where its prompt and additions are
    (row ``index`` of ``origin``) and the tokens it generated so far."""

    job: GenerationJob
    origin: PreparedBatch
    index: int
    sliceable: bool
    generated: list[int] = field(default_factory=list)
    slices: int = 0  # slices decoded so far
    decoder: IncrementalDecoder | None = None  # a streaming row's detokenizer, kept across slices
    kv: tuple[DecodeState, int] | None = None  # its last slice's decoding state, and its row there

    @property
    def state(self) -> DecodeState | None:
        """The decoding state this row can go on from (None: decode it from the start)."""
        return self.kv[0] if self.kv is not None and not self.kv[0].used else None

    @property
    def tenant(self) -> str:
        return self.job.request.tenant

    @property
    def prompt(self) -> list[int]:
        return [*self.origin.prompts[self.index], *self.generated]

    @property
    def remaining(self) -> int:
        return self.job.options.max_new_tokens - len(self.generated)

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.origin.stops[self.index])

    def options(self, slice_tokens: int | None) -> GenerationOptions:
        """This round's options: the rest of the row's tokens, at most ``slice_tokens`` if
        the request asked for more than two slices (a short request decodes whole)."""
        n = self.remaining
        if slice_tokens and self.sliceable and self.job.options.max_new_tokens > 2 * slice_tokens:
            n = min(n, slice_tokens)
        return replace(self.job.options, max_new_tokens=n)

    def advance(self, completion: Completion, tokenizer: Any, budget: int) -> Completion | None:
        """Take one slice's completion (decoded with ``max_new_tokens=budget``); the row's
        whole completion once it is done, else None."""
        first = not self.slices
        last = budget >= self.remaining  # the slice was allowed all the tokens left
        before = len(self.generated)
        self.generated += completion.token_ids
        self.slices += 1
        ended = completion.finish_reason == "stop"  # end of sequence or a stop sequence
        if first and (ended or last):
            return replace(completion)  # decoded in one piece: exactly as generate made it
        at = stop_reached(tokenizer, self.generated, self.stops, since=before)
        if at is not None:  # a stop sequence across the slices' seam
            del self.generated[at:]
            ended = True
        if not ended and not last:
            return None
        return Completion(
            text=completion_text(tokenizer, self.generated, self.stops if ended else ()),
            token_ids=list(self.generated),
            prompt_tokens=len(self.origin.prompts[self.index]),
            finish_reason="stop" if ended else "length",
        )


def cost(rows: Sequence[Row], options: GenerationOptions) -> tuple[int, int]:
    """Groups of a round run cheapest first: shortest context, then fewest new tokens."""
    return max(len(row.prompt) for row in rows), options.max_new_tokens


def kept_bytes(rows: Iterable[Row]) -> int:
    """The bytes of the decoding states ``rows`` hold (each state counted once)."""
    states = {id(state): state for row in rows if (state := row.state) is not None}
    return sum(state.nbytes for state in states.values())


def keep_state(carry: KvCarry, group: list[Row], unfinished: list[Row], budget: list[int]) -> bool:
    """Give the ``unfinished`` rows of ``group`` the state their slice stopped at, if the
    backend left one and ``budget[0]`` (bytes) holds it (whether it did; the budget is
    charged); else none, and ``carry.state`` is left as it was."""
    for row in unfinished:
        row.kv = None
    state = carry.state
    if state is None or not unfinished:
        return False
    size = state.nbytes * len(unfinished) // state.rows  # every row holds as many ids
    if size > budget[0]:
        return False
    at = {id(row): i for i, row in enumerate(group)}
    kept = state.select([at[id(row)] for row in unfinished])
    budget[0] -= size
    for i, row in enumerate(unfinished):
        row.kv = (kept, i)
    return True


def prefill_chunk(
    backend: Backend,
    group: list[Row],
    prepared: PreparedBatch,
    carry: KvCarry,
    budget: list[int],
    tokens: int | None,
) -> bool:
    """Read the next ``tokens`` ids of the group's prompts (``prepared``: its rows), if
    more than that are unread and the state can be kept; whether it did (else the group
    decodes now, going on from ``carry``)."""
    unread = carry.state.unread if carry.state else max(len(row.prompt) for row in group)
    if not (tokens and group[0].sliceable and unread > tokens):
        return False
    read = backend.prefill([row.prompt for row in group], prepared.additions, carry, tokens)
    return read and keep_state(carry, group, group, budget)


def tenant_of(item: Row | GenerationJob) -> Hashable:
    return item.tenant if isinstance(item, Row) else item.request.tenant


def sliceable(prepared: PreparedBatch, options: GenerationOptions) -> bool:
    """Whether rows of ``prepared`` decode the same in slices (see the module docstring)."""
    if options.temperature > 0 and options.seed is not None:
        return False
    return all(isinstance(a, SteeringAddition) for a in prepared.additions)


def stop_reached(
    tokenizer: Any, tokens: Sequence[int], stops: Sequence[str], *, since: int
) -> int | None:
    """The number of tokens at which :class:`~fints.stopping.StopSequences` would have
    ended ``tokens`` decoded in one piece, looking at the lengths after ``since`` (None:
    no stop sequence there)."""
    if not stops:
        return None
    import torch

    criterion = StopSequences(tokenizer, 0, [tuple(stops)])
    ids = torch.tensor([list(tokens)], dtype=torch.long)
    for n in range(since + 1, len(tokens) + 1):
        criterion(ids[:, :n])  # type: ignore[arg-type]
        if criterion.stopped_at[0] is not None:
            return n
    return None


def remember(
    seen: dict[str, float], tenants: Iterable[str], now: float, window: float
) -> dict[str, float]:
    """``seen`` (tenant: when it last had a row in a round) less the tenants not seen for
    ``window`` seconds, with ``tenants`` seen ``now``."""
    kept = {tenant: at for tenant, at in seen.items() if now - at < window}
    kept.update(dict.fromkeys(tenants, now))
    return kept


def pick_fair(
    queue: Sequence[Item],
    tenant: Callable[[Item], Hashable],
    max_rows: int,
    recent: set[Hashable],
) -> tuple[list[Item], bool]:
    """The items of one round, and whether tenants contend (see the module docstring).

    ``queue`` is in arrival order; ``recent``: the tenants served lately.
    Tenants take turns, the one whose oldest item is oldest first, one item per turn; under
    contention each takes at most ``max(1, max_rows // tenants)``."""
    by_tenant: dict[Hashable, list[Item]] = {}
    for item in queue:
        by_tenant.setdefault(tenant(item), []).append(item)
    contended = len(by_tenant.keys() | recent) >= 2
    cap = max(1, max_rows // len(by_tenant.keys() | recent)) if contended else max_rows
    picked: list[Item] = []
    for turn in range(cap):
        for items in by_tenant.values():  # dicts keep insertion order: oldest tenant first
            if turn < len(items) and len(picked) < max_rows:
                picked.append(items[turn])
    return picked, contended
