"""Guidance as a generation mode of the engine: preferences per request, the classifier
library on disk (safetensors + JSON), clear refusals, and steering plus guidance on the
same row (tiny random llama, hashing key encoder)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fints.engine import GenerationRequest, Personalizer
from fints.errors import InvalidInputError
from fints.generation import GenerationOptions
from fints.guidance.classifier import Backbone, GuidanceClassifier
from fints.guidance.library import ClassifierLibrary
from fints.guidance.mode import GuidanceMode
from fints.guidance.preferences import Preferences
from fints.injection import steer
from fints.models import LoadedModel
from fints.modes import MODES
from fints.prompts import build_prompt_ids
from fints.steering import SteeringConfig
from fints.store import Store
from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama
from tests.unit.guidance_fixtures import random_classifier
from tests.unit.test_modes import imported_user

OPTIONS = GenerationOptions(max_new_tokens=5, ignore_eos=True)
HAPPY = Preferences({"mood": {"happy": 4.0}})


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_llama()


@pytest.fixture(scope="module")
def library(model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> ClassifierLibrary:
    backbone = Backbone(model, layers=2)
    library = ClassifierLibrary(tmp_path_factory.mktemp("classifiers"))
    library.save(random_classifier(backbone, "mood", ("happy", "sad"), seed=1))
    library.save(random_classifier(backbone, "length", ("concise", "long"), seed=2))
    return library


@pytest.fixture(scope="module")
def engine(
    model: LoadedModel, library: ClassifierLibrary, tmp_path_factory
) -> Iterator[Personalizer]:
    store = Store(Path(tmp_path_factory.mktemp("store")) / "store.sqlite")
    engine = Personalizer(
        model, store, encoder=HashEncoder(), modes=("steering", GuidanceMode(library))
    )
    engine.import_dictionary(imported_user(model, "alice", 0))
    yield engine
    store.close()


def texts(engine: Personalizer, requests: list[GenerationRequest]) -> list[str]:
    return [r.text for r in engine.generate(requests, OPTIONS)]


def test_rows_with_other_preferences_or_none_decode_in_one_batch(engine: Personalizer) -> None:
    q = "How should I spend a rainy Sunday?"
    batch = [
        GenerationRequest(None, q, preferences=HAPPY),
        GenerationRequest(None, q),
        GenerationRequest(None, q, preferences=Preferences({"mood": {"sad": 4.0}})),
        GenerationRequest(None, q, preferences=Preferences({"mood": {"happy": 0.0}})),
    ]
    got = texts(engine, batch)
    alone = [texts(engine, [r])[0] for r in batch]
    assert got == alone
    assert got[1] == got[3]  # weight 0 is plain decoding
    assert len({got[0], got[1], got[2]}) == 3  # each preference moves the text its own way


def test_results_say_how_a_row_was_guided(engine: Personalizer) -> None:
    (result,) = engine.generate([GenerationRequest(None, "Hi there", preferences=HAPPY)], OPTIONS)
    assert "guided (full vocabulary): mood=happy:4" in result.note


def test_steering_and_guidance_on_the_same_row(engine: Personalizer, model: LoadedModel) -> None:
    q = "alice wrote about topic 2"
    off = SteeringConfig(enabled=False)
    both, steered, guided, plain = texts(
        engine,
        [
            GenerationRequest("alice", q, preferences=HAPPY),
            GenerationRequest("alice", q),
            GenerationRequest("alice", q, steering=off, preferences=HAPPY),
            GenerationRequest("alice", q, steering=off),
        ],
    )
    assert len({both, steered, guided, plain}) == 4
    # the first token of the combined row: guidance applied to the steered distribution
    prepared = engine.prepare([GenerationRequest("alice", q, preferences=HAPPY)])
    vectors = prepared.additions[0].vectors  # type: ignore[attr-defined]
    ids = torch.tensor([build_prompt_ids(model.tokenizer, engine.template, q, [])])
    with torch.no_grad(), steer(model.layout, vectors):
        logits = model.model(ids).logits[0, -1]
    mood = engine.modes[1].library.get("mood")  # type: ignore[attr-defined]
    hidden, _ = mood.backbone.forward(torch.tensor([list(mood.config.lead_ids)]))
    scored = logits.log_softmax(-1) + 4.0 * mood.log_probs_full(hidden[:, -1])[0, :, 0]
    first = str(model.tokenizer.decode([int(scored.argmax())])).strip()
    assert both.startswith(first) and first


@pytest.mark.parametrize(
    ("prefs", "match"),
    [
        (
            Preferences({"colour": {"red": 1.0}}),
            r"unknown preference 'colour'.*\['length', 'mood'\]",
        ),
        (Preferences({"mood": {"angry": 1.0}}), r"unknown class 'angry'.*\['happy', 'sad'\]"),
        (Preferences({"../x": {"a": 1.0}}), "classifier name"),
    ],
)
def test_unknown_preferences_are_named(
    engine: Personalizer, prefs: Preferences, match: str
) -> None:
    with pytest.raises(InvalidInputError, match=match) as err:
        engine.generate([GenerationRequest(None, "Hi", preferences=prefs)], OPTIONS)
    assert err.value.param == "preferences"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"preferences": {"mood": {"happy": -0.5}}}, "finite number in"),
        ({"preferences": {"mood": {"happy": float("nan")}}}, "finite number in"),
        ({"preferences": {"mood": {"happy": float("inf")}}}, "finite number in"),
        ({"preferences": {"mood": {"happy": True}}}, "finite number in"),
        ({"preferences": {"mood": "happy"}}, "must map class names"),
        ({"preferences": ["mood"]}, "must map a dimension"),
        ({"preferences": {"mood": {"happy": 1}}, "guidance": {"method": "beam"}}, "method"),
        ({"preferences": {"mood": {"happy": 1}}, "guidance": {"top_k": 0}}, "top_k"),
        ({"preferences": {"mood": {"happy": 1}}, "guidance": {"k": 3}}, "unknown guidance"),
    ],
)
def test_bad_preferences_are_refused_with_the_reason(data: dict, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        Preferences.from_dict(data)


def test_preferences_round_trip_through_json() -> None:
    prefs = Preferences({"mood": {"happy": 0.5}, "length": {"concise": 1}}, "topk", 7)
    assert Preferences.from_dict(json.loads(json.dumps(prefs.to_dict()))) == prefs
    assert Preferences.from_dict({}) is None
    assert not Preferences({"mood": {"happy": 0}}).active


def test_a_classifier_for_another_tokenizer_is_refused(
    library: ClassifierLibrary, engine: Personalizer, tmp_path: Path
) -> None:
    clf = library.get("mood")
    folder = clf.save(tmp_path / "mood")
    config = json.loads((folder / "classifier.json").read_text())
    config["tokenizer_fingerprint"] = "0" * 32
    (folder / "classifier.json").write_text(json.dumps(config))
    other = ClassifierLibrary(tmp_path)
    other.add_backbone(clf.backbone)
    plain = Personalizer(
        engine.model, engine.store, encoder=HashEncoder(), modes=(GuidanceMode(other),)
    )
    with pytest.raises(InvalidInputError, match="another tokenizer") as err:
        plain.generate([GenerationRequest(None, "Hi", preferences=HAPPY)], OPTIONS)
    assert err.value.param == "preferences"


def test_a_saved_classifier_loads_with_the_same_head(library: ClassifierLibrary) -> None:
    saved = library.get("mood")
    fresh = ClassifierLibrary(library.folder)
    fresh.add_backbone(saved.backbone)
    loaded = fresh.get("mood")
    assert loaded is not saved and loaded.config == saved.config
    h = torch.randn(2, saved.embeddings.shape[1])
    torch.testing.assert_close(loaded.log_probs_full(h), saved.log_probs_full(h))
    files = sorted(p.name for p in (library.folder / "mood").iterdir())
    assert files == ["classifier.json", "head.safetensors"]
    meta = json.loads((library.folder / "mood" / "classifier.json").read_text())
    assert meta["classes"] == ["happy", "sad"] and len(meta["tokenizer_fingerprint"]) == 32
    assert set(meta) >= {"backbone", "backbone_fingerprint", "metrics", "layers"}


def test_the_guidance_mode_is_registered() -> None:
    assert "guidance" in MODES


def test_a_classifier_of_another_backbone_is_refused(library: ClassifierLibrary) -> None:
    other = Backbone(tiny_llama(), layers=3)
    with pytest.raises(InvalidInputError, match="trained on backbone"):
        GuidanceClassifier(library.get("mood").config, library.get("mood").head, other)


def test_a_default_engine_runs_guidance(model: LoadedModel, engine: Personalizer) -> None:
    default = Personalizer(model, engine.store, encoder=HashEncoder())
    assert any(isinstance(m, GuidanceMode) for m in default.modes)
