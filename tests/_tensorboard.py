"""Reading the TensorBoard scalars a training run wrote (shared by the trainer and incremental tests)."""

from __future__ import annotations

from pathlib import Path


def scalars(event_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one TensorBoard scalar, from the event files in `event_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(event_dir.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {event_dir}"
    out = []
    for file in files:
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out += [(e.step, e.value) for e in acc.Scalars(tag)]
    return out
