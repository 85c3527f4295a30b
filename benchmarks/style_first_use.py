"""What a request asking for 'own-style' costs: the first one trains the user's style
classifier (the demo users' histories in a fresh store), a second one reuses it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/style_first_use.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from fints import Personalizer, Store, load_model
from fints.demo import DEMO_USERS, demo_data_dir
from fints.engine import GenerationRequest
from fints.generation import GenerationOptions
from fints.guidance.classifier import read_config
from fints.guidance.library import ClassifierLibrary
from fints.guidance.mode import GuidanceMode
from fints.guidance.preferences import Preferences
from fints.guidance.user_style import style_folder
from fints.history import read_history


def main() -> None:
    torch.set_num_threads(1)
    model = load_model()
    print(f"{model.name} {model.dtype}, one thread; 1-token answers")
    own = Preferences({"own-style": {"own": 0.5}})
    options = GenerationOptions(max_new_tokens=1)
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "s.sqlite") as store:
        mode = GuidanceMode(ClassifierLibrary(Path(tmp) / "classifiers"))
        engine = Personalizer(model, store, modes=("steering", mode))
        for user in DEMO_USERS:
            store.add_items("default", user, read_history(demo_data_dir() / f"{user}.jsonl"))
        print(
            f"{'user':<16}{'first s':>9}{'second s':>10}{'own':>5}{'others':>8}{'held-out acc':>14}"
        )
        for user in DEMO_USERS:
            seconds = []
            for _ in range(2):
                began = time.perf_counter()
                engine.generate([GenerationRequest(user, "Tell me about the sea.",
                                                   preferences=own)], options)  # fmt: skip
                seconds.append(time.perf_counter() - began)
            config = read_config(style_folder(store, "default", user))
            data, test = config.metrics["data"], config.metrics["test"]
            print(f"{user:<16}{seconds[0]:>9.2f}{seconds[1]:>10.2f}{data['own']:>5}"
                  f"{data['others']:>8}{test['text_accuracy']:>14.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
