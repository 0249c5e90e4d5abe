"""The causal probe: a decoder is told from an encoder by running it, not by its mask spelling."""

from __future__ import annotations

import pytest

from planer import api
from planer.fixtures.build import fixture_path


@pytest.mark.parametrize(("family", "kind", "causal"), [
    ("bert", "encoder", False), ("gpt2", "decoder", True), ("vit", "encoder", None)])
def test_inspect_probes_causality(family: str, kind: str, causal: bool | None) -> None:
    summary = api.inspect(fixture_path(family))
    assert (summary.kind, summary.data["causal"]) == (kind, causal)
