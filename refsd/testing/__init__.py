"""Public testing API: Hypothesis strategies for op inputs and
``assert_rewrite_equivalent`` with tolerances derived from the precision mode.

Test your own rewrite::

    from hypothesis import given
    from refsd import ops
    from refsd.testing import assert_rewrite_equivalent, strategies as st

    def my_linear(x, w, b):            # your graph rewrite
        return ops.conv2d(x[:, :, None, :], w.T[None, None], b)[:, :, 0, :]

    @given(st.linear_inputs())
    def test_my_linear(args):
        x, w, b = args
        for mode in ("f32", "f32_f16"):
            assert_rewrite_equivalent(ops.linear, my_linear, x, w, b, mode=mode)
"""

from refsd.testing import strategies
from refsd.testing.equivalence import Comparison, RewriteMismatch, assert_rewrite_equivalent, compare
from refsd.testing.rounding_budgets import BUDGET, OVERRIDES, UNIT_ROUNDOFF

__all__ = ["BUDGET", "Comparison", "OVERRIDES", "RewriteMismatch", "UNIT_ROUNDOFF", "assert_rewrite_equivalent",
           "compare", "strategies"]
