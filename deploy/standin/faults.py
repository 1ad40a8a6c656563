"""Fault knobs for tests: which Predict calls to delay, fail with a status code, or leave hanging."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from enum import Enum

import grpc


class FaultKind(Enum):
    """What happens to one call after its optional delay."""

    NONE = "none"
    FAIL = "fail"
    HANG = "hang"


@dataclass(frozen=True)
class FaultDecision:
    """The fate of one call."""

    delay_s: float
    kind: FaultKind


def parse_status_code(text: str) -> grpc.StatusCode:
    """A gRPC status code from its name (`UNAVAILABLE`, `unavailable`) or number (`14`); never OK."""
    cleaned = text.strip().upper()
    for code in grpc.StatusCode:
        if cleaned in (code.name, str(code.value[0])):
            if code is grpc.StatusCode.OK:
                raise ValueError("the fault status code cannot be OK")
            return code
    names = ", ".join(code.name for code in grpc.StatusCode if code is not grpc.StatusCode.OK)
    raise ValueError(f"unknown gRPC status code {text!r}; one of {names}")


@dataclass(frozen=True)
class FaultPlan:
    """The knobs, all off by default: rates are fractions of calls in [0, 1]."""

    fail_rate: float = 0.0
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    delay_ms: float = 0.0
    hang_rate: float = 0.0

    def __post_init__(self) -> None:
        """Reject rates outside [0, 1], a negative delay, and OK as a failure code."""
        for name, rate in (("fail rate", self.fail_rate), ("hang rate", self.hang_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {rate}")
        if self.delay_ms < 0:
            raise ValueError(f"delay must not be negative, got {self.delay_ms} ms")
        if self.fail_code is grpc.StatusCode.OK:
            raise ValueError("the fault status code cannot be OK")

    @property
    def active(self) -> bool:
        """True when any knob is turned on."""
        return self.fail_rate > 0 or self.hang_rate > 0 or self.delay_ms > 0


def decide(plan: FaultPlan, draw_hang: float, draw_fail: float) -> FaultDecision:
    """The fate of a call given two uniform draws in [0, 1): hanging wins over failing."""
    if draw_hang < plan.hang_rate:
        kind = FaultKind.HANG
    elif draw_fail < plan.fail_rate:
        kind = FaultKind.FAIL
    else:
        kind = FaultKind.NONE
    return FaultDecision(delay_s=plan.delay_ms / 1000.0, kind=kind)


class FaultInjector:
    """Draws decisions for concurrent calls from one (optionally seeded) random stream."""

    def __init__(self, plan: FaultPlan, seed: int | None = None) -> None:
        """Inject `plan`'s faults; a `seed` makes the sequence of decisions reproducible."""
        self.plan = plan
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def next_decision(self) -> FaultDecision:
        """The fate of the next call."""
        if not self.plan.active:
            return FaultDecision(0.0, FaultKind.NONE)
        with self._lock:
            draws = self._random.random(), self._random.random()
        return decide(self.plan, *draws)
