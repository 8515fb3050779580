"""Rematerialisation policies for the layer scans of every model, by name.

What the forward pass keeps for the backward pass of one scanned layer:
  everything  keep nothing, recompute the whole layer (least memory);
  dots        keep the outputs of the weight matmuls (dot_generals without batch dimensions: projections and
              MLPs, linear in the tokens) and recompute the rest; attention's q·k and p·v dots have batch
              dimensions (batch, heads), so the L² logits are never kept;
  nothing     no remat.
Configs written before the names existed say True / False (everything / nothing).
"""

from __future__ import annotations

import jax

from opensora_jax.errors import UserError

REMAT_POLICIES = {
    "everything": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing": None,
}


def remat_policy_name(value) -> str:
    """The remat policy name of a config value: a name of REMAT_POLICIES, or True/False (everything/nothing)."""
    if isinstance(value, bool):
        return "everything" if value else "nothing"
    if not isinstance(value, str) or value not in REMAT_POLICIES:
        raise UserError(f"remat {value!r} unknown; choose one of {', '.join(REMAT_POLICIES)} (or True / False)")
    return value


def remat(body, name: str):
    """`body` wrapped in jax.checkpoint with policy `name` (unchanged for "nothing")."""
    if name == "nothing":
        return body
    return jax.checkpoint(body, policy=REMAT_POLICIES[name])
