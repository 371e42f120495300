"""`dasd sweep --seeds`: a count, a list, or one seed with a trailing comma; bad values refused with the fix."""

import pytest

from dasd_megatron.errors import ConfigError
from dasd_megatron.sweep.runner import parse_seeds


@pytest.mark.parametrize("text, seeds", [("3", (1, 2, 3)), ("1,7,42", (1, 7, 42)), ("3,", (3,)), ("0,", (0,))])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text, match", [("0", "count must be >= 1"), ("a,b", "expected a count"),
                                         ("1,-2", "must be >= 0")])
def test_bad_seeds(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_seeds(text)
