"""The vLLM engine on the real SmolLM2: steering inside vLLM equals the transformers
engine's, and a continuous batch gives every row its own result.

Runs where vLLM is installed (`make install-vllm`; CI installs it); skipped elsewhere.
"""

from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed: `make install-vllm` runs these tests")

from vllm import SamplingParams

from fints.engine import GenerationRequest, Personalizer
from fints.extraction import ExtractionConfig
from fints.generation import GenerationOptions, eos_token_ids
from fints.history import HistoryItem
from fints.sites import Site, parse_sites
from fints.steering import SteeringConfig
from fints.store import Store
from fints.vllm_engine.requests import vllm_rows
from fints.vllm_plugin.packing import STEERING_KEY, pack_steering

pytestmark = pytest.mark.slow

TOPICS = ("cats", "the sea", "bread", "rain")
VOICES = {
    "pirate": "Arr, {t} be a fine treasure, matey! Yo ho ho!",
    "formal": "Certainly. {t} merit careful, formal study.",
    "poet": "O {t}, soft as twilight, sing to me of yesterday.",
    "chef": "Season {t} with salt, butter and a splash of lemon.",
    "coach": "Push harder! {t} are just another rep. No excuses!",
    "child": "i like {t} they are super fun and cool!!!",
    "lawyer": "Pursuant to section 4, {t} shall be deemed property.",
    "robot": "BEEP. {t} DETECTED. PROCESSING COMPLETE. BOOP.",
}
QUERIES = ("Tell me about dogs.", "What is the moon?")
STEER = SteeringConfig(relative=True, strengths={"attn": 0.4, "mlp": 0.4, "block": 0.1}, top_k=3)
OPTIONS = GenerationOptions(max_new_tokens=16)


@pytest.fixture(scope="module")
def engines(smollm, encoder, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("vllm-store") / "fints.sqlite")
    extraction = ExtractionConfig(
        sites=parse_sites("12.attn+mlp,14.block"), method="context", batch_size=4
    )
    made = {
        backend: Personalizer(
            smollm, store, encoder=encoder, steering=STEER, extraction=extraction, backend=backend
        )
        for backend in ("transformers", "vllm")
    }
    for user, voice in VOICES.items():
        made["transformers"].add_history(
            user, [HistoryItem(f"Tell me about {t}.", voice.format(t=t)) for t in TOPICS]
        )
    return made


def requests() -> list[GenerationRequest]:
    users = [*VOICES, None]
    return [GenerationRequest(u, q) for u, q in itertools.product(users, QUERIES)]


def test_steered_rows_equal_the_transformers_engine(engines):
    reference = engines["transformers"].generate(requests(), OPTIONS)
    served = engines["vllm"].generate(requests(), OPTIONS)
    pairs = [(a.text, b.text) for a, b in zip(reference, served, strict=True)]
    assert sum(r.steered for r in served) == len(VOICES) * len(QUERIES)
    # the same first 16 words on >= 90% of the rows (kernels differ), most rows identical
    assert sum(a.split()[:16] == b.split()[:16] for a, b in pairs) >= 0.9 * len(pairs), pairs
    assert sum(a == b for a, b in pairs) >= 0.8 * len(pairs), pairs
    plain = [r.text for r in served[-len(QUERIES) :]]
    steered = [r.text for r in served[: -len(QUERIES)]]
    assert sum(t not in plain for t in steered) >= len(steered) // 2  # steering acts


def test_a_zero_vector_is_token_identical_to_plain_vllm(engines, smollm):
    llm = engines["vllm"].backend.llm
    prompts = [engines["vllm"].prepare([GenerationRequest(None, q)]).prompts[0] for q in QUERIES]
    zero = {STEERING_KEY: pack_steering({Site(12, "attn"): torch.zeros(576)})}
    plain = SamplingParams(temperature=0, max_tokens=32)
    zeroed = SamplingParams(temperature=0, max_tokens=32, extra_args=zero)
    outs = llm.generate(
        [{"prompt_token_ids": list(p)} for p in prompts] * 2,
        [plain] * len(prompts) + [zeroed] * len(prompts),
        use_tqdm=False,
    )
    ids = [o.outputs[0].token_ids for o in outs]
    assert ids[: len(prompts)] == ids[len(prompts) :]


def test_a_continuous_batch_gives_every_row_its_unbatched_result(engines, smollm):
    """8 users and unsteered rows, some arriving while others decode."""
    vllm = engines["vllm"]
    prepared = vllm.prepare(
        [GenerationRequest(u, QUERIES[i % 2]) for i, u in enumerate([*VOICES, None, None])]
    )
    rows = vllm_rows(prepared.prompts, prepared.additions, OPTIONS, None, eos_token_ids(smollm))
    llm = vllm.backend.llm
    alone = [  # salted apart: the batched rows compute their own (steered) prefill
        llm.generate(
            [{**r.prompt, "cache_salt": f"alone-{i}"}], SamplingParams(**r.sampling), use_tqdm=False
        )[0]
        .outputs[0]
        .token_ids
        for i, r in enumerate(rows)
    ]
    engine = llm.llm_engine
    done: dict[str, list[int]] = {}
    pending = list(enumerate(rows))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and (step == 0 or step % 3 == 0):  # a few rows join every third step
            for i, row in pending[:3]:
                engine.add_request(f"row-{i}", row.prompt, SamplingParams(**row.sampling))
            pending = pending[3:]
        for output in engine.step():
            if output.finished:
                done[output.request_id] = list(output.outputs[0].token_ids)
        step += 1
    assert step > 9 and len(rows) == 10  # rows really joined mid-decode
    assert [done[f"row-{i}"] for i in range(len(rows))] == [list(a) for a in alone]
