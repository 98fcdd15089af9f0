from collections import deque
from random import Random

TRANSITIONS_KEPT: int

class FastSession:
    state: int
    remote_state: int
    local_diag: int
    detect_mult: int
    remote_detect_mult: int
    local_discr: int
    remote_discr: int
    config_tx_us: int
    desired_min_tx_us: int
    required_min_rx_us: int
    remote_min_rx_us: int
    remote_desired_min_tx_us: int
    remote_demand: bool
    passive: bool
    _poll: bool
    transitions: deque[tuple[int, int, int, float]]
    transition_count: int
    received: int
    sent: int
    discards: dict[str, int]
    def __init__(self, local_discr: int, tx_us: int = ..., rx_us: int = ..., multiplier: int = ..., *,
                 passive: bool = ..., rng: Random | None = ...) -> None: ...
    def detection_time(self) -> float: ...
    def tx_interval(self) -> float: ...
    def next_deadline(self) -> float | None: ...
    def set_timers(self, tx_us: int, rx_us: int, now: float) -> None: ...
    def admin_down(self, now: float) -> None: ...
    def admin_up(self, now: float) -> None: ...
    def tick(self, now: float) -> list[bytes]: ...
    def receive(self, data: bytes | bytearray | memoryview, now: float) -> list[bytes]: ...
