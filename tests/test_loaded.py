"""pipeline.loaded: a module another thread is still importing is returned only once its
import has ended (a half-initialized pandas failed a resumed run's sampler with
``partially initialized module 'pandas' has no attribute 'DataFrame'``)."""

from __future__ import annotations

import sys
import threading
import time

from pipeline.loaded import loaded

SLOW_MODULE = """\
import builtins
builtins.pipeline_test_slow_started.set()
builtins.pipeline_test_slow_release.wait(60)
VALUE = 1
"""


def test_a_module_being_imported_by_another_thread_is_returned_whole(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "pipeline_test_slow_mod.py").write_text(SLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    started, release = threading.Event(), threading.Event()
    monkeypatch.setattr(builtins, "pipeline_test_slow_started", started, raising=False)
    monkeypatch.setattr(builtins, "pipeline_test_slow_release", release, raising=False)
    importer = threading.Thread(target=__import__, args=("pipeline_test_slow_mod",))
    outcome: list = []

    def reader():
        try:
            outcome.append(loaded("pipeline_test_slow_mod").VALUE)
        except Exception as exc:  # the half-initialized module of a bare sys.modules read
            outcome.append(exc)

    importer.start()
    try:
        assert started.wait(60)
        assert "pipeline_test_slow_mod" in sys.modules  # half-initialized: no VALUE yet
        reading = threading.Thread(target=reader)
        reading.start()
        # Release the import only once the reader has read (no fix) or waits for the import.
        deadline = time.monotonic() + 60
        while not outcome and not _waits_for_an_import(reading) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        release.set()
        importer.join(60)
    reading.join(60)
    sys.modules.pop("pipeline_test_slow_mod", None)
    assert outcome == [1]


def _waits_for_an_import(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code.co_filename == "<frozen importlib._bootstrap>" and frame.f_code.co_name == "acquire":
            return True  # the module's import lock, held by the importing thread
        frame = frame.f_back
    return False


def test_a_module_nobody_imported_is_none_and_stays_unimported():
    assert loaded("pipeline_test_never_imported") is None
    assert "pipeline_test_never_imported" not in sys.modules
    assert loaded("json") is sys.modules["json"]
