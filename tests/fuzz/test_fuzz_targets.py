"""The bounded fuzz run inside the test suite (well under 60 s): hypothesis on the HTTP core
over a socket, on the config loader and on the flow loader.

Longer runs: ``python -m tests.fuzz --minutes N`` (same targets, more examples, fresh seeds).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.harness import CONFIG_SEEDS, FLOW_SEEDS, HttpTarget, check_config, check_flow
from tests.fuzz.mutate import BASE_REQUESTS, TOKENS, mutate

EXAMPLES = 300  # per target and backend in the suite: a few seconds each
# The suite's run is the same every time (a CI failure reproduces, and one helper's landing
# does not fail on what another's random draw found); ``python -m tests.fuzz`` explores
# with fresh seeds.
SUITE = settings(derandomize=True, database=None)

# A mutation plan: where and what, drawn by hypothesis so failures shrink.
_edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 4),
                            st.sampled_from(TOKENS), st.integers(0, 255)), max_size=6)


def apply(data: bytes, edits: list[tuple[int, int, bytes, int]]) -> bytes:
    out = bytearray(data)
    for pos, kind, token, byte in edits:
        pos = pos % (len(out) + 1)
        if kind == 0 and out:
            out[min(pos, len(out) - 1)] = byte
        elif kind == 1:
            out[pos:pos] = token
        elif kind == 2:
            del out[pos:pos + 1 + byte % 16]
        elif kind == 3:
            out[pos:pos] = out[pos:pos + 1 + byte % 64]
        else:
            del out[pos:]
    return bytes(out)


@pytest.fixture(scope="module", params=["asyncio", "trio"])
def target(request: pytest.FixtureRequest) -> Iterator[HttpTarget]:
    with HttpTarget(request.param).running() as running:
        yield running


HTTP_MUTATED = {"base": st.sampled_from(BASE_REQUESTS), "edits": _edits,
                "chunks": st.integers(1, 4), "reset": st.booleans()}
HTTP_RANDOM = {"data": st.binary(max_size=2048)}


def http_mutated(target: HttpTarget, base: bytes, edits: list[tuple[int, int, bytes, int]],
                 chunks: int, reset: bool) -> None:
    """Any mutated request: a valid HTTP answer (or none), and the server lives on."""
    answer = target.exchange(apply(base, edits), chunks=chunks, reset=reset)
    target.check(answer)


def http_random(target: HttpTarget, data: bytes) -> None:
    target.check(target.exchange(data))


_FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
test_http_core_answers_or_closes = settings(
    SUITE, max_examples=EXAMPLES, deadline=None, suppress_health_check=_FIXTURE_OK)(
    given(**HTTP_MUTATED)(http_mutated))
test_http_core_survives_random_bytes = settings(
    SUITE, max_examples=EXAMPLES // 3, deadline=None, suppress_health_check=_FIXTURE_OK)(
    given(**HTTP_RANDOM)(http_random))


def _text_mutations(seeds: list[str]) -> st.SearchStrategy[str]:
    tokens = ["&a ", "*a", "<<: *a", "${env:X}", "${env:NOPE}", "${file:/dev/null}", "!!binary",
              "!!python/object:os.system", "[" * 50, "{", "- ", ": ", "\t", "\x00", "~", "1e999",
              "-1", "99999999999999999999", "'", '"', "\n  ", "\n", "#", "%YAML 1.1\n",
              "---\n", "? ", "!!merge"]

    @st.composite
    def mutated(draw: st.DrawFn) -> str:
        text = draw(st.sampled_from(seeds))
        for _ in range(draw(st.integers(1, 5))):
            pos = draw(st.integers(0, len(text)))
            kind = draw(st.integers(0, 2))
            if kind == 0:
                text = text[:pos] + draw(st.sampled_from(tokens)) + text[pos:]
            elif kind == 1:
                text = text[:pos] + text[pos + draw(st.integers(1, 40)):]
            else:
                text = text[:pos] + draw(st.text(max_size=8)) + text[pos:]
        return text

    return mutated()


CONFIG_TEXT = {"text": _text_mutations(CONFIG_SEEDS)}
FLOW_TEXT = {"text": _text_mutations(FLOW_SEEDS)}


def config_text(text: str) -> None:
    """A mutated config loads or raises ConfigError, within 2 s (no bombs, no tracebacks)."""
    check_config(text)


def flow_text(text: str) -> None:
    check_flow(text)


test_config_loader_fails_only_with_config_errors = pytest.mark.slow(settings(
    SUITE, max_examples=EXAMPLES, deadline=2000)(given(**CONFIG_TEXT)(config_text)))
test_flow_loader_fails_only_with_config_errors = pytest.mark.slow(settings(
    SUITE, max_examples=EXAMPLES, deadline=2000)(given(**FLOW_TEXT)(flow_text)))


def test_mutator_reaches_the_framing_code() -> None:
    """The socket fuzzer's mutator keeps most requests parseable enough to get past the
    request line (else it would test only the first line's parser)."""
    rng = random.Random(1)
    heads = sum(b"\r\n\r\n" in mutate(rng, base) for base in BASE_REQUESTS for _ in range(50))
    assert heads > 0.5 * 50 * len(BASE_REQUESTS)
