"""Per-user LoRA on the real SmolLM2: trained with PEFT, loaded by PEFT itself, and one
greedy batch mixing users' adapters and users' steering dictionaries, each row
token-identical to its own unbatched run."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from fints.adapters.config import LoraTrainConfig
from fints.adapters.host import AdapterHost
from fints.adapters.jobs import Job, train_task, train_users
from fints.engine import GenerationRequest, Personalizer
from fints.extraction import ExtractionConfig
from fints.generation import GenerationOptions
from fints.history import HistoryItem
from fints.prompts import get_template
from fints.sites import parse_sites
from fints.steering import SteeringConfig
from fints.store import Store

TOPICS = ("cats", "the sea", "bread", "rain")
PIRATE = [
    HistoryItem(f"Tell me about {t}.", f"Arr, {t} be a fine treasure, matey!") for t in TOPICS
]
FORMAL = [
    HistoryItem(f"Tell me about {t}.", f"Certainly. {t.capitalize()} merit formal study.")
    for t in TOPICS
]
OPTIONS = GenerationOptions(max_new_tokens=10)
STEER = SteeringConfig(relative=True, strengths={"attn": 0.4, "mlp": 0.4}, top_k=2)
OFF = SteeringConfig(enabled=False)
#: Short and strong enough to change what the 135M model says in 10 tokens.
QUICK = LoraTrainConfig(lr=2e-3, epochs=2, batch_size=4, max_target_tokens=24)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(smollm, encoder, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("lora") / "fints.sqlite")
    # the context contrast (cheap to extract): what these tests steer with beside the adapters
    extraction = ExtractionConfig(sites=parse_sites("12.attn+mlp"), method="context", batch_size=4)
    p = Personalizer(smollm, store, encoder=encoder, steering=STEER, extraction=extraction)
    p.add_history("pirate", PIRATE)
    p.add_history("formal", FORMAL)
    job = Job(smollm, store, get_template("generic"), QUICK)
    train_task(job, "chat")
    train_users(job, ["pirate", "formal"], task="chat")
    yield p
    store.close()


def test_a_mixed_batch_of_adapters_and_dictionaries_equals_unbatched_rows(engine) -> None:
    batch = [
        GenerationRequest("pirate", "Tell me about the moon."),  # adapter + steering
        GenerationRequest("formal", "Tell me about dogs."),  # adapter + steering
        GenerationRequest(None, "Tell me about the moon."),  # base model
        GenerationRequest("pirate", "Tell me about dogs.", steering=OFF),  # adapter only
        GenerationRequest("formal", "Tell me about the moon.", adapter=False),  # steering only
        GenerationRequest("formal", "Tell me about the moon.", steering=OFF),  # adapter only
    ]
    batched = engine.generate(batch, OPTIONS)
    alone = [engine.generate([r], OPTIONS)[0] for r in batch]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.adapter for r in batched] == ["pirate", "formal", None, "pirate", None, "formal"]
    assert [r.steered for r in batched] == [True, True, False, False, True, False]
    # the adapters change the answer: formal's adapter alone vs the base model
    assert batched[5].text != batched[2].text


def test_peft_loads_a_stored_smollm_adapter_with_our_logits(engine) -> None:
    from fints.adapters.storage import AdapterStore

    model = engine.model
    stored = AdapterStore(engine.store, model).require_user_adapter("default", "pirate")
    assert stored.meta.task_rank == 8 and stored.meta.user_rank == 8
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model.model), str(stored.folder))
    ids = torch.tensor([model.tokenizer("Tell me about the moon.")["input_ids"]])
    host = AdapterHost(model)
    name = host.load(stored.folder)
    with torch.no_grad(), host.routing([name]):
        ours = model.model(input_ids=ids).logits
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    assert torch.allclose(ours, expected, atol=1e-4)
