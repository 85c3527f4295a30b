"""The server's generation engines by name (``ServerConfig.engine``, ``fints serve --engine``)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fints.engine import Personalizer
from fints.errors import InvalidInputError
from fints.serving.app import create_app
from fints.serving.engines import ENGINES
from tests.unit.test_hardening_limits import CONFIG, personalizer

__all__ = ["personalizer"]  # the module fixture, shared


def test_an_unknown_engine_is_refused_naming_the_known_ones(personalizer: Personalizer) -> None:
    with pytest.raises(InvalidInputError, match=r"unknown engine 'nope'.*transformers.*vllm"):
        create_app(personalizer, replace(CONFIG, engine="nope"))


def test_on_transformers_generation_goes_to_the_writer_batcher(personalizer: Personalizer) -> None:
    server = create_app(personalizer, CONFIG).state.fints
    assert server.generation.batcher is server.batcher
    assert sorted(ENGINES) == ["transformers", "vllm"]
