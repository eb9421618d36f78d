"""Warnings go through ``warnings`` with datatrace categories that users can filter."""

from __future__ import annotations

import warnings

import pytest
import torch

import datatrace
from datatrace import InfluenceAttributor, Task


def _cg_that_stops_early() -> InfluenceAttributor:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double().eval()
    train = (torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,)))
    attr = InfluenceAttributor(Task(model), solver="cg", solver_options={"max_iter": 1})
    return attr.fit(train)


def _queries() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4, dtype=torch.float64), torch.tensor([0, 1])


def test_categories_form_a_filterable_hierarchy():
    assert issubclass(datatrace.DatatraceWarning, UserWarning)
    for cls in (datatrace.CostWarning, datatrace.AccuracyWarning, datatrace.ConvergenceWarning):
        assert issubclass(cls, datatrace.DatatraceWarning)
    # approximate results stay RuntimeWarnings, as they were before the categories existed
    assert issubclass(datatrace.ConvergenceWarning, datatrace.AccuracyWarning)
    assert issubclass(datatrace.AccuracyWarning, RuntimeWarning)


def test_a_known_warning_names_the_callers_line_and_its_category():
    attr = _cg_that_stops_early()
    with pytest.warns(datatrace.ConvergenceWarning, match="CG stopped after 1 iterations") as rec:
        attr.attribute(_queries())
    # attributed to this file (the user's call), not to a line inside datatrace
    ours = [w for w in rec if issubclass(w.category, datatrace.DatatraceWarning)]
    assert [w.filename for w in ours] == [__file__]


def test_simplefilter_error_turns_a_datatrace_warning_into_an_exception():
    attr = _cg_that_stops_early()
    with warnings.catch_warnings():
        warnings.simplefilter("error", datatrace.DatatraceWarning)
        with pytest.raises(datatrace.ConvergenceWarning, match="Raise solver_options"):
            attr.attribute(_queries())


def test_simplefilter_ignore_silences_them(recwarn):
    attr = _cg_that_stops_early()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", datatrace.DatatraceWarning)
        attr.attribute(_queries())
    assert not [w for w in recwarn if issubclass(w.category, datatrace.DatatraceWarning)]
