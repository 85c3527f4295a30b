"""End-to-end behaviour on the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fints.engine import GenerationRequest, Personalizer
from fints.errors import DictionaryMismatchError, InvalidInputError, UnknownUserError
from fints.extraction import ExtractionConfig, Extractor
from fints.generation import GenerationOptions
from fints.history import HistoryItem
from fints.models import load_model, pick_dtype, resolve_source
from fints.prompts import TEMPLATES
from fints.sites import parse_sites
from fints.steering import SteeringConfig
from fints.store import Store

PIRATE = [
    HistoryItem(f"Tell me about {t}.", f"Arr, {t} be a fine treasure, matey! Yo ho ho!")
    for t in ("cats", "the sea", "bread", "rain", "books", "maps")
]
FORMAL = [
    HistoryItem(f"Tell me about {t}.", f"Certainly. {t.capitalize()} merit careful, formal study.")
    for t in ("cats", "the sea", "bread", "rain", "books", "maps")
]
OPTIONS = GenerationOptions(max_new_tokens=12)
STEER = SteeringConfig(relative=True, strengths={"attn": 0.4, "mlp": 0.4, "block": 0.1}, top_k=3)


@pytest.fixture(scope="module")
def engine(smollm, encoder, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("store") / "fints.sqlite")
    # the paper's context contrast, named: trained vectors (the default) have their own tests
    extraction = ExtractionConfig(
        sites=parse_sites("12.attn+mlp,14.block"), method="context", batch_size=4
    )
    p = Personalizer(smollm, store, encoder=encoder, steering=STEER, extraction=extraction)
    p.add_history("pirate", PIRATE)
    p.add_history("formal", FORMAL)
    return p


def test_embedded_model_is_cached_as_safetensors(smollm):
    folder = Path(resolve_source(None))
    weights = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    assert weights
    written = {p: p.stat().st_mtime_ns for p in weights}
    again = load_model()
    # the ~20 s dequantization is not repeated: the cached weights are read, not rewritten
    assert {p: p.stat().st_mtime_ns for p in weights} == written
    assert again.fingerprint == smollm.fingerprint  # the same weights, whatever the dtype
    assert again.dtype == pick_dtype("auto", "cpu") and smollm.dtype == torch.float32
    assert smollm.tokenizer.padding_side == "left"
    assert (smollm.num_layers, smollm.hidden_size) == (30, 576)


def test_system_prompt_is_ours_not_the_templates_default(smollm):
    text = smollm.tokenizer.decode(
        __import__("fints.prompts", fromlist=["x"]).build_prompt_ids(
            smollm.tokenizer, TEMPLATES["generic"], "hi"
        )
    )
    assert "SmolLM" not in text and TEMPLATES["generic"].system_prompt in text


def test_dictionary_has_an_entry_per_item_with_metadata(engine, smollm):
    d = engine.dictionary("pirate")
    assert d is not None and len(d) == len(PIRATE)
    assert d.meta.model_fingerprint == smollm.fingerprint
    assert [str(s) for s in d.meta.sites] == ["12.attn", "12.mlp", "14.block"]
    assert d.vectors.shape == (6, 3, 576) and torch.isfinite(d.vectors).all()
    assert all(n > 0 for n in d.meta.site_norms)
    assert d.vectors.norm(dim=-1).min() > 0  # own context really differs from other users'


def test_steering_changes_output_and_zero_strength_does_not(engine):
    plain = engine.generate([GenerationRequest(None, "Tell me about dogs.")], OPTIONS)[0]
    steered = engine.generate(
        [
            GenerationRequest(
                "pirate",
                "Tell me about dogs.",
                steering=STEER.with_(strengths={"attn": 2.0, "mlp": 2.0, "block": 0.5}),
            )
        ],
        OPTIONS,
    )[0]
    zero = engine.generate(
        [
            GenerationRequest(
                "pirate",
                "Tell me about dogs.",
                steering=STEER.with_(strengths={"attn": 0, "mlp": 0, "block": 0}),
            )
        ],
        OPTIONS,
    )[0]
    assert steered.steered and steered.text != plain.text
    assert zero.steered and zero.text == plain.text
    assert not plain.steered and plain.note == "no user given"
    disabled = engine.generate(
        [GenerationRequest("pirate", "Tell me about dogs.", steering=STEER.with_(enabled=False))],
        OPTIONS,
    )[0]
    assert not disabled.steered and disabled.text == plain.text and not disabled.retrieved


def test_batch_of_users_equals_each_alone(engine, tmp_path):
    """Greedy text of each row equals its solo run (float32: bf16 rounding differs by padding)."""
    fp32 = engine.model  # the session's SmolLM2 is float32 (tests/conftest.py)
    engine = Personalizer(
        fp32, engine.store, encoder=engine.encoder, steering=STEER, extraction=engine.extraction
    )
    engine.store.add_items("default", "pirate32", PIRATE)
    engine.store.add_items("default", "formal32", FORMAL)
    engine.build("pirate32", progress=False)
    engine.build("formal32", progress=False)
    requests = [
        GenerationRequest("pirate32", "Tell me about dogs."),
        GenerationRequest("formal32", "Tell me about the moon, please."),
        GenerationRequest("nobody", "Tell me about dogs."),
        GenerationRequest("pirate32", "What is bread?", steering=STEER.with_(aggregation="mean")),
    ]
    batched = engine.generate(requests, OPTIONS)
    for request, result in zip(requests, batched, strict=True):
        alone = engine.generate([request], OPTIONS)[0]
        assert result.text == alone.text, request
        assert result.text
        assert result.retrieved == alone.retrieved
    assert all(r.startswith(tuple(i.item_id for i in PIRATE)) for r in batched[0].retrieved)
    formal_ids = {i.item_id for i in FORMAL}
    assert set(batched[1].retrieved) <= formal_ids and batched[1].retrieved
    assert not batched[2].steered and "unknown user" in batched[2].note


def test_stop_sequence_ends_decoding_of_its_row_only(engine):
    """A row stops at its own stop sequence (fewer tokens, text cut before it); others don't."""
    options = GenerationOptions(max_new_tokens=24)
    queries = ["Tell me about dogs.", "Tell me about the moon."]
    plain = engine.generate([GenerationRequest("pirate", q) for q in queries], options)
    words = plain[0].text.split()
    assert len(words) > 3 and plain[0].completion_tokens > 6
    stop = " " + words[2]
    stopped = engine.generate(
        [
            GenerationRequest("pirate", queries[0], stop=(stop, "never appears")),
            GenerationRequest("pirate", queries[1]),
        ],
        options,
    )
    assert stopped[0].text == plain[0].text[: plain[0].text.index(stop)]
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].completion_tokens < plain[0].completion_tokens
    assert stopped[1].text == plain[1].text
    assert stopped[1].completion_tokens == plain[1].completion_tokens
    with pytest.raises(InvalidInputError, match="stop sequence is empty"):
        GenerationRequest("pirate", "hi", stop=("",))


def test_in_context_retrieval_puts_own_items_in_the_prompt(engine):
    with_icl = engine.prepare(
        [GenerationRequest("pirate", "Tell me about maps.", steering=STEER.with_(icl_k=2))]
    )
    text = engine.model.tokenizer.decode(with_icl.prompts[0])
    assert "Arr, maps be a fine treasure" in text
    assert "Certainly." not in text


def test_unknown_user_policy_error(engine):
    strict = Personalizer(engine.model, engine.store, encoder=engine.encoder, unknown_user="error")
    with pytest.raises(UnknownUserError, match="nobody"):
        strict.generate([GenerationRequest("nobody", "hi")], OPTIONS)


def test_dictionary_from_another_model_is_a_clear_error(engine, tmp_path):
    other = Personalizer(engine.model, engine.store, encoder=engine.encoder)
    exported = engine.dictionary("pirate")
    assert exported is not None
    exported.meta = type(exported.meta)(**{**exported.meta.__dict__, "model_fingerprint": "x" * 64})
    exported.save(tmp_path / "pirate")
    from fints.dictionary import UserDictionary

    engine.store.import_dictionary("elsewhere", UserDictionary.load(tmp_path / "pirate"))
    # the store keeps it under its own fingerprint; checking it against this model fails
    with pytest.raises(DictionaryMismatchError, match="not from the loaded model"):
        UserDictionary.load(tmp_path / "pirate").meta.check_model(
            other.model.fingerprint, other.model.hidden_size, other.model.num_layers
        )
    served = other.generate([GenerationRequest("pirate", "hi", tenant="elsewhere")], OPTIONS)[0]
    assert not served.steered and "no dictionary for this model" in served.note
    with pytest.raises(DictionaryMismatchError, match="fints build"):
        other.import_dictionary(UserDictionary.load(tmp_path / "pirate"), tenant="third")
    assert not other.store.has_user("third", "pirate")


def test_response_contrast_extracts_and_filters(smollm, encoder):
    config = ExtractionConfig(
        sites=parse_sites("12.attn"),
        method="response",
        params={"rouge_threshold": 0.5, "rejected_max_new_tokens": 16},
        batch_size=3,
    )
    extractor = Extractor(smollm, encoder, TEMPLATES["generic"], config)
    result = extractor.extract(PIRATE[:3], PIRATE, FORMAL, progress=False)
    assert len(result.entries) + len(result.skipped) == 3
    assert result.meta.method == "response"
    assert result.meta.method_config["params"]["rouge_threshold"] == 0.5
    for entry in result.entries:
        assert entry.vector.values.shape == (1, 576) and entry.vector.values.norm() > 0
