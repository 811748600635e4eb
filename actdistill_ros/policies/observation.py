"""What every teacher family's ``encode`` returns: the backbone's layer-0 tokens of a batch, laid out
modality by modality, and the ids of those modalities. The router, run_backbone and distillation
read observations only through this, so they work with every family (policies/vla, policies/hf_vla).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

VISUAL, LANGUAGE, STATE, ACTION_QUERY = 0, 1, 2, 3


@dataclass
class EncodedObservation:
    """Layer-0 input of the backbone for a batch."""

    tokens: Tensor  # (B, N, W)
    valid: Tensor  # (B, N) bool: False for padding tokens
    segment: Tensor  # (N,) long: VISUAL / LANGUAGE / STATE / ACTION_QUERY per position
    spans: dict[int, slice]  # the positions of each modality (see segment_spans), known on the host
    padded: frozenset[int]  # the modalities that may hold padding tokens; every other token is valid

    def attention_mask(self) -> Tensor:
        """(B, 1, 1, N) bool: True where a key may be attended to."""
        return self.valid[:, None, None, :]

    @property
    def readout_span(self) -> slice:
        """The positions the action head reads: the action-query token(s)."""
        return self.spans[ACTION_QUERY]

    def readout(self, hidden: Tensor) -> Tensor:
        """(B, N, W) hidden states -> (B, R, W) at the readout positions."""
        return hidden[:, self.readout_span]

    def modality_tokens(self, segment: int) -> tuple[Tensor, Tensor | None]:
        """Views of one modality's tokens (B, n, W) and their validity (B, n), None where the modality
        has no padding; n = 0 if it has no tokens."""
        span = self.spans.get(segment, slice(0, 0))
        return self.tokens[:, span], self.valid[:, span] if segment in self.padded else None


def segment_spans(segments: list[int]) -> dict[int, slice]:
    """Segment id per position -> the slice each modality occupies. Every family lays its tokens
    out modality by modality, so a modality is read as a view, without a mask or a host sync."""
    spans: dict[int, slice] = {}
    for position, segment in enumerate(segments):
        span = spans.get(segment)
        if span is not None and span.stop != position:
            raise ValueError(f"token layout: modality {segment} is not contiguous in {segments}")
        spans[segment] = slice(position if span is None else span.start, position + 1)
    return spans
