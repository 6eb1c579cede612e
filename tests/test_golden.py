"""The refactored pipeline computes bit-identical factors to the code before it (issue 10's golden test).

``tests/golden/factors_sha256.json`` was written by ``tests/golden/make_golden.py`` from the pre-refactor
commit; every case recomputes the SHA-256 of every factor here and must find the same bytes. The three
progressive cases were regenerated once, on purpose, by the alignment fix of issue 14 (the ridge left the
truncation metric), which changes layers >= 1 of those cases only; the other cases still hold the
pre-refactor bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from golden.make_golden import CASES, factor_hashes

GOLDEN = json.loads((Path(__file__).parent / "golden" / "factors_sha256.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_factors_are_bit_identical(case):
    assert factor_hashes(CASES[case]) == GOLDEN[case]
