"""Deliveries to one connection, checked by seq: the product's own check.

`chat-service loadtest` counts with `chatservice.tally.SeqTally`; the scripts here use
the same class, so their figures and the product's mean the same (see its docstring for
what each count means).
"""

from __future__ import annotations

from chatservice.tally import SeqTally as Tally

__all__ = ["Tally"]
