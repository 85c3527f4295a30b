"""Training jobs on a store: a tenant's task adapter from all (or some) users' history,
and users' adapters from their own history, on top of the task adapter if there is one.
What the ``fints lora`` commands and the benchmark run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fints.adapters.config import LoraTrainConfig
from fints.adapters.files import AdapterError, compose
from fints.adapters.storage import AdapterStore, StoredAdapter
from fints.adapters.training import LoraTrainer, OnStep, TrainedAdapter, training_examples
from fints.errors import InvalidInputError
from fints.history import HistoryItem
from fints.models import LoadedModel
from fints.prompts import PromptTemplate
from fints.store import Store


@dataclass(frozen=True)
class Job:
    """What a job trains on and how."""

    model: LoadedModel
    store: Store
    template: PromptTemplate
    config: LoraTrainConfig
    tenant: str = "default"

    @property
    def adapters(self) -> AdapterStore:
        return AdapterStore(self.store, self.model)

    def examples(self, items: Sequence[HistoryItem]) -> list[tuple[list[int], list[int]]]:
        pairs = training_examples(self.model, self.template, items, self.config.max_target_tokens)
        return [(list(p), list(t)) for p, t in pairs]

    def _meta(self, trained: TrainedAdapter, kind: str) -> dict[str, object]:
        return {
            "kind": kind,
            "model_fingerprint": self.model.fingerprint,
            "model_name": self.model.name,
            "train_config": {**self.config.to_dict(), "template": self.template.name},
            "items": trained.items,
            "train_seconds": round(trained.seconds, 3),
        }


def train_task(
    job: Job, task: str, users: Sequence[str] | None = None, on_step: OnStep | None = None
) -> StoredAdapter:
    """The tenant's task adapter ``task``, trained on the history of ``users`` (default:
    every user of the tenant)."""
    chosen = list(users) if users is not None else job.store.users(job.tenant)
    items = [item for user in chosen for item in job.store.items(job.tenant, user)]
    if not items:
        raise InvalidInputError(f"tenant {job.tenant!r} has no history to train a task adapter on")
    trained = LoraTrainer(job.model).train(job.examples(items), job.config, on_step=on_step)
    meta = {**job._meta(trained, "task"), "task_rank": trained.weights.rank}
    return job.adapters.save_task(job.tenant, task, trained.weights, meta)


@dataclass(frozen=True)
class UserTrained:
    user: str
    stored: StoredAdapter
    trained: TrainedAdapter  # the user's own part (without the task adapter)


def train_users(
    job: Job,
    users: Sequence[str],
    task: str | None = None,
    *,
    on_user: Callable[[str, int], object] | None = None,
    on_step: OnStep | None = None,
) -> list[UserTrained]:
    """Each user's adapter on their own history (OPPU: on top of the task adapter
    ``task``, stored together with it); ``on_user(user, steps)`` before each user."""
    adapters = job.adapters
    task_weights, task_meta = None, None
    if task is not None:
        found = adapters.task_adapter(job.tenant, task)
        if found is None:
            raise AdapterError(
                f"tenant {job.tenant!r} has no task adapter {task!r} for model "
                f"{job.model.name!r}; train it with `fints lora train-task`"
            )
        task_weights, task_meta = adapters.weights(found), found.meta
    trainer = LoraTrainer(job.model, task=task_weights)
    done = []
    for user in users:
        items = job.store.items(job.tenant, user)  # unknown user: UnknownUserError
        if on_user is not None:
            batches = -(-len(items) // job.config.batch_size)
            on_user(user, batches * job.config.epochs)
        trained = trainer.train(job.examples(items), job.config, on_step=on_step)
        meta = {**job._meta(trained, "user"), "user_rank": trained.weights.rank}
        weights = trained.weights
        if task_weights is not None and task_meta is not None:
            weights = compose(task_weights, trained.weights)
            meta |= {"task_rank": task_weights.rank, "task_sha256": task_meta.weights_sha256}
        done.append(UserTrained(user, adapters.save_user(job.tenant, user, weights, meta), trained))
    return done
