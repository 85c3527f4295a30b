"""Guidance with the real SmolLM2: a mood classifier on its first layers trained on a few
moodswapper answers beats chance on held-out prompts, and guided rows of one batch move
towards their mood while the plain row is plain decoding."""

from __future__ import annotations

import pytest
import torch

from fints.engine import GenerationRequest, Personalizer
from fints.generation import GenerationOptions
from fints.guidance.classifier import Backbone
from fints.guidance.library import ClassifierLibrary
from fints.guidance.mode import GuidanceMode
from fints.guidance.preferences import Preferences
from fints.guidance.recipes import read_moods, split_texts
from fints.guidance.training import TrainConfig, encode_texts, train_classifier
from fints.store import Store

pytestmark = pytest.mark.slow
OPTIONS = GenerationOptions(max_new_tokens=12)


def test_a_trained_mood_classifier_guides_smollm(smollm, tmp_path) -> None:
    pairs = [p for p in read_moods() if p.mood in ("happy", "depressed")]
    train, test = split_texts(pairs, [p.mood for p in pairs], 24, 10)
    backbone = Backbone(smollm, layers=4)
    clf = train_classifier(
        "mood", backbone, train, test, TrainConfig(max_tokens=24, epochs=20, batch_tokens=256)
    )
    assert clf.config.metrics["test"]["text_accuracy"] >= 0.75, clf.config.metrics
    library = ClassifierLibrary(tmp_path / "classifiers")
    library.save(clf)
    store = Store(tmp_path / "store.sqlite")
    engine = Personalizer(smollm, store, modes=(GuidanceMode(library),))
    q = "What should I do this weekend?"
    # a classifier of 24 texts a class is overconfident; calibrated (its temperature fitted
    # on the held-out texts) it is a weak per-token judge, so the rows ask for weight 4
    assert clf.config.temperature > 1
    plain, happy, sad = engine.generate(
        [
            GenerationRequest(None, q),
            GenerationRequest(None, q, preferences=Preferences({"mood": {"happy": 4.0}})),
            GenerationRequest(
                None, q, preferences=Preferences({"mood": {"depressed": 4.0}}, "topk", 20)
            ),
        ],
        OPTIONS,
    )
    alone = engine.generate([GenerationRequest(None, q)], OPTIONS)[0]
    store.close()
    assert plain.text == alone.text
    assert len({plain.text, happy.text, sad.text}) == 3

    @torch.no_grad()
    def p_happy(text: str) -> float:
        (ids,) = encode_texts(backbone.tokenizer, [text], 16)
        states, _ = backbone.forward(torch.tensor([ids]))
        candidates = torch.tensor(ids[1:]).unsqueeze(1)  # each position's next token
        log_p = clf.log_probs_candidates(states[0, :-1], candidates)[:, 0]  # as guidance does
        return float(log_p[:, clf.classes.index("happy")].mean())

    assert p_happy(happy.text) > p_happy(plain.text) > p_happy(sad.text)
