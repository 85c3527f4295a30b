"""A seeded schemathesis run of the fints HTTP API (issue 25).

Every operation of the server's own OpenAPI document gets ``--examples`` generated inputs
that match the schema and as many that do not; every response is checked against the
document (status code listed, content type, body schema) and must not be a 5xx.

    python benchmarks/api_fuzz.py --examples 600      # an in-process server, tiny llama
    python benchmarks/api_fuzz.py --url http://127.0.0.1:8000 --examples 100

The test suite runs the same function with a few examples per operation
(``tests/e2e/test_hardening_api_fuzz.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

OWN_TENANT = {"x-fints-tenant": "default"}  # the tenant of a server without keys
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass
class FuzzReport:
    by_operation: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    server_errors: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_operation.values())

    def render(self) -> str:
        lines = [f"{self.total} generated inputs, {self.server_errors} 5xx, "]
        lines[0] += f"{len(self.failures)} schema violations"
        lines += [f"  {n:>6}  {op}" for op, n in sorted(self.by_operation.items())]
        lines.append(
            "statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(self.by_status.items()))
        )
        lines += [f"  FAIL {f}" for f in self.failures[:20]]
        return "\n".join(lines)


def fuzz_api(
    url: str, *, examples: int, seed: int, headers: dict[str, str] | None = None
) -> FuzzReport:
    """Run ``examples`` positive and ``examples`` negative inputs per operation."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    report = FuzzReport()
    for result in schema.get_all_operations():
        operation = cast(Any, result).ok()  # an invalid operation raises here
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"{operation.label} ({mode.value})"
            # inputs that match the schema name the key's own tenant, or nearly all would
            # be 403s; the others keep whatever was generated
            sent = {**(headers or {}), **(OWN_TENANT if mode is GenerationMode.POSITIVE else {})}
            _run(operation, mode, label, url, examples, seed, sent, report)
    return report


def _run(
    operation: Any,
    mode: GenerationMode,
    label: str,
    url: str,
    examples: int,
    seed: int,
    headers: dict[str, str] | None,
    report: FuzzReport,
) -> None:
    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        report.by_operation[label] += 1
        try:
            response = case.call(base_url=url, headers=headers, timeout=120)
        except Exception as exc:  # the connection itself failed: count it as a server error
            report.server_errors += 1
            report.failures.append(f"{label}: {type(exc).__name__}: {exc}")
            return
        report.by_status[str(response.status_code)] += 1
        if response.status_code >= 500:
            report.server_errors += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except Exception as exc:
            report.failures.append(f"{label}: {response.status_code}: {str(exc)[:300]}")

    with contextlib.suppress(Unsatisfiable):  # no input of this mode (negative /health)
        run()


def _tiny_server(tmp: Path) -> Any:
    """An in-process server around the tests' tiny random llama (no model to load)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fints.engine import Personalizer
    from fints.serving.app import ServerConfig, create_app
    from fints.serving.inprocess import RunningServer
    from fints.serving.payloads import Limits
    from fints.store import Store
    from tests.unit.benchmark_fixtures import HashEncoder, tiny_llama

    personalizer = Personalizer(tiny_llama(), Store(tmp / "store.sqlite"), encoder=HashEncoder())
    config = ServerConfig(
        limits=Limits(max_tokens=4, default_max_tokens=2, max_prompt_tokens=256),
        extract_on_write=False,
        max_wait_ms=0,
    )
    return RunningServer(create_app(personalizer, config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="per operation and mode")
    parser.add_argument("--seed", type=int, default=25)
    parser.add_argument("--url", help="a running server (default: an in-process one)")
    parser.add_argument("--api-key")
    args = parser.parse_args()
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    began = time.perf_counter()
    if args.url:
        report = fuzz_api(args.url.rstrip("/"), examples=args.examples, seed=args.seed)
    else:
        import torch

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp, _tiny_server(Path(tmp)) as server:
            report = fuzz_api(server.url, examples=args.examples, seed=args.seed, headers=headers)
    print(report.render())
    print(f"{time.perf_counter() - began:.0f} s")
    sys.exit(1 if report.failures or report.server_errors else 0)


if __name__ == "__main__":
    main()
