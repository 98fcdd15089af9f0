"""Options of SiteAgent that are refused before anything starts."""

from __future__ import annotations

import pytest

from patronus.agent import AGENT_NICE, SiteAgent
from patronus.errors import ConfigError


@pytest.mark.parametrize("nice", [-21, 20, True, 1.5, "5"])
def test_a_priority_outside_the_schedulers_range_is_refused(tmp_path, nice):
    with pytest.raises(ConfigError, match="nice"):
        SiteAgent(tmp_path / "state.db", "s0", nice=nice)


def test_the_default_priority_runs_ahead_of_ordinary_work(tmp_path):
    assert SiteAgent(tmp_path / "state.db", "s0").nice == AGENT_NICE < 0
    assert SiteAgent(tmp_path / "state.db", "s0", nice=0).nice == 0
