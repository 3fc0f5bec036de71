"""Sibling adapters: projections that read the same input (q, k, v; gate, up) share one dropout mask and
one A matmul. An opt-in (`LoRAConfig.share_sibling_input`).

Each adapter of a group draws no mask of its own: the first member called with an input drops it out
once and multiplies it by all the members' A matrices stacked, ``dropout(x) @ [A_q; A_k; A_v]^T``, and
each member takes its slice. The trained parameters, checkpoints and PEFT exports are unchanged; what
differs from PEFT (and from this package's default) is the random stream: PEFT draws one mask per
adapter, so q, k and v see three independent masks, while here they see the same one. Eval mode is
identical to the default up to float rounding (there is no mask then).

A member called with another input than the group's last one (cross-attention keys and values, or a
model that calls its projections in another order) computes the shared step again for that input, so
the result is always right; only the saving is lost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

# Children of one module that, in the architectures this package knows, read the same input tensor.
SIBLING_NAMES: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}),
)


class SiblingMember(Protocol):
    """What a group needs of each adapter (`LoRALinear` is one); the layer imports this module, not the
    other way round."""

    in_features: int
    r: int
    lora_A: nn.Parameter  # noqa: N815 (PEFT's name)
    lora_dropout: nn.Module
    siblings: SiblingGroup | None


class SiblingGroup:
    """The shared step of a group of adapters; held (not registered) by each member."""

    def __init__(self, members: Sequence[SiblingMember]) -> None:
        self.members = list(members)
        self._input: torch.Tensor | None = None
        self._version = -1
        self._slices: dict[int, torch.Tensor] = {}

    def down(self, member: SiblingMember, x: torch.Tensor) -> torch.Tensor:
        """`member`'s ``dropout(x) @ A^T``, computed once for the whole group per input."""
        if self._input is not x or self._version != x._version or id(member) not in self._slices:
            self._compute(x)
        out = self._slices.pop(id(member))
        if not self._slices:  # every member took its slice: drop the references to the graph
            self._input = None
        return out

    def _compute(self, x: torch.Tensor) -> None:
        first = self.members[0]
        dropped = first.lora_dropout(x.to(first.lora_A.dtype))
        stacked = torch.cat([m.lora_A for m in self.members])
        down = F.linear(dropped, stacked)
        ranks = [m.r for m in self.members]
        self._slices = {id(m): part for m, part in zip(self.members, down.split(ranks, dim=-1), strict=True)}
        self._input, self._version = x, x._version


def group_siblings(layers: Mapping[str, SiblingMember]) -> list[SiblingGroup]:
    """Give each set of sibling adapters (same parent, names in one of `SIBLING_NAMES`, same input size,
    dropout and dtype) a shared `SiblingGroup`; layers without siblings are left alone."""
    by_parent: dict[tuple[str, frozenset[str]], list[SiblingMember]] = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        for names in SIBLING_NAMES:
            if child in names:
                by_parent.setdefault((parent, names), []).append(layer)
    groups = []
    for members in by_parent.values():
        first = members[0]
        same = all(
            m.in_features == first.in_features
            and m.lora_A.dtype == first.lora_A.dtype
            and _dropout_p(m) == _dropout_p(first)
            for m in members
        )
        if len(members) < 2 or not same:
            continue
        group = SiblingGroup(members)
        for member in members:
            member.siblings = group
        groups.append(group)
    return groups


def _dropout_p(layer: SiblingMember) -> float:
    return float(getattr(layer.lora_dropout, "p", 0.0))
