"""The example's status-file callback leaves no thread behind: a daemon thread still inside torch when the interpreter
exits aborts the process (exit code -6 after the model was saved, seen once in ``make demo`` under load)."""

from __future__ import annotations

import json
import threading

import torch

from examples.lightning.train import PeerStatusFile


class _Trainer:
    callback_metrics = {"train_loss": torch.tensor(0.5)}  # the writer converts tensors: it calls into torch


def _writer_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "PeerStatusFile"]


def test_the_writer_thread_ends_at_teardown_and_the_file_keeps_the_last_state(tmp_path):
    status = PeerStatusFile(str(tmp_path / "status.json"), interval=0.01)
    try:
        status.on_train_start(_Trainer(), None)
        assert _writer_threads()
        status.on_train_end(status.trainer, None)
        status.teardown(status.trainer, None, "fit")
        assert _writer_threads() == []
        snapshot = json.loads((tmp_path / "status.json").read_text())
        assert snapshot["state"] == "finished" and snapshot["train_loss"] == 0.5
        status.teardown(status.trainer, None, "validate")  # again, after trainer.validate: nothing to do
    finally:
        status.stop()  # (a failed check must not leave the thread to abort pytest at exit)


def test_the_writer_thread_ends_when_training_is_interrupted(tmp_path):
    status = PeerStatusFile(str(tmp_path / "status.json"), interval=0.01)
    try:
        status.on_train_start(_Trainer(), None)
        status.on_exception(status.trainer, None, KeyboardInterrupt())
        assert _writer_threads() == []
        assert json.loads((tmp_path / "status.json").read_text())["state"] == "left"
    finally:
        status.stop()
