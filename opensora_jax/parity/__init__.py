"""`python -m opensora_jax.parity CASE_DIR ...`: the fixtures' documented command for the parity checker.

The checker lives in `opensora_jax.tools.parity`; this package only keeps the short command working.
"""
