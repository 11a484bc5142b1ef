"""raytr.training.loop.ScalarLog: TensorBoard scalars written in bursts, each with its own step and time."""

from __future__ import annotations

import time

from raytr.training.loop import ScalarLog


class RecordingWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int, float]] = []
        self.flushes = 0
        self.closed = False

    def add_scalar(self, tag, value, step, walltime=None):
        self.scalars.append((tag, value, step, walltime))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


def test_scalars_wait_for_a_full_burst_and_keep_their_step_and_wall_time():
    writer, synced = RecordingWriter(), []
    log = ScalarLog(writer, synced.append, burst=3, max_delay_s=3600)
    before = time.time()
    log.add("train/learning_rate", 0.5, 1)
    time.sleep(0.02)
    log.add("train/learning_rate", 0.25, 2)
    assert writer.scalars == []  # held back: no wake-up of the writer's thread per step
    time.sleep(0.02)
    log.add("train/loss", 3.0, 3)
    assert [(t, v, s) for t, v, s, _ in writer.scalars] == [
        ("train/learning_rate", 0.5, 1), ("train/learning_rate", 0.25, 2), ("train/loss", 3.0, 3)]
    times = [w for *_, w in writer.scalars]
    assert before <= times[0] < times[1] < times[2] <= time.time()  # when added, not when written (all at once)
    assert writer.flushes == 0 and synced == []


def test_flush_and_close_write_what_is_pending_and_sync():
    writer, synced = RecordingWriter(), []
    log = ScalarLog(writer, synced.append, burst=100, max_delay_s=3600)
    log.add("a", 1.0, 1)
    log.flush()
    assert [s for _, _, s, _ in writer.scalars] == [1] and writer.flushes == 1 and synced == [False]
    log.add("a", 2.0, 2)
    log.close()
    assert [s for _, _, s, _ in writer.scalars] == [1, 2] and writer.closed and synced == [False, True]


def test_an_old_pending_scalar_is_written_without_waiting_for_the_burst():
    writer = RecordingWriter()
    log = ScalarLog(writer, burst=100, max_delay_s=0.05)
    log.add("a", 1.0, 1)
    assert writer.scalars == []
    time.sleep(0.06)
    log.add("a", 2.0, 2)  # the first one is older than max_delay_s: both go out
    assert [s for _, _, s, _ in writer.scalars] == [1, 2]


def test_event_files_hold_the_wall_time_of_each_add(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    log = ScalarLog(SummaryWriter(log_dir=str(tmp_path)), burst=10)
    added = []
    for step in range(1, 4):
        added.append(time.time())
        log.add("train/learning_rate", 0.1 * step, step)
        time.sleep(0.02)
    log.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/learning_rate")
    assert [e.step for e in events] == [1, 2, 3]
    for event, at in zip(events, added):
        assert abs(event.wall_time - at) < 0.01  # written at close, stamped when added
