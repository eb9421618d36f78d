"""Property-based fuzzing of the public API over every registered method id (issue 18).

The property: every call returns finite scores of the right shape, or raises a
``DatatraceError`` subclass whose message names the bad value; NaN/inf in (data or
weights) is a ``NumericalError`` out, never NaN scores. The cases and their verdicts are in
:mod:`tests.fuzz.harness`.

Hypothesis runs derandomized (a fixed seed) with a bounded example count, so CI sees the
same calls every time. To explore with many more examples and tally the verdicts without
stopping at the first failure (the figures of docs/reliability.md)::

    DATATRACE_FUZZ_EXAMPLES=400 DATATRACE_FUZZ_TALLY=out/fuzz.json pytest tests/fuzz
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from datatrace import ConfigError, Task, make_attributor
from tests.fuzz.harness import KINDS, METHOD_IDS, PASSING, TALLY, cases, net, recorded_run, run_case

EXAMPLES = int(os.environ.get("DATATRACE_FUZZ_EXAMPLES", "3"))
TALLY_PATH = os.environ.get("DATATRACE_FUZZ_TALLY")  # set: record every verdict, assert none

FUZZ = settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def recorded():
    run = recorded_run()
    yield run
    if TALLY_PATH:
        path = Path(TALLY_PATH)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(TALLY.to_json(), indent=1))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHOD_IDS)
def test_every_call_returns_finite_scores_or_a_clean_error(method, kind, recorded):
    @FUZZ
    @given(data=st.data())
    def prop(data):
        case = data.draw(cases(method, kind, recorded), label="case")
        verdict, detail = run_case(case, recorded)
        TALLY.add(case, verdict, detail)
        if not TALLY_PATH:
            assert verdict in PASSING, f"{verdict}: {detail}"

    prop()


def test_unknown_method_ids_name_the_id_and_the_registered_ones():
    for bad in ("trek", "", "IF-EKFAC", None, 3):
        with pytest.raises(ConfigError) as info:
            make_attributor(bad, Task(net()))  # type: ignore[arg-type]
        assert repr(bad) in str(info.value) and "grad-dot" in str(info.value)
