"""Running engine work off the GUI thread, with progress delivered on the GUI thread."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from qtpy.QtCore import QObject, Signal

SYNC_ENV = "NAPARI_JOINTATTN_SYNC"


def synchronous() -> bool:
    """Workers run in the calling thread when ``NAPARI_JOINTATTN_SYNC=1`` (deterministic tests)."""
    return os.environ.get(SYNC_ENV, "") not in ("", "0", "false", "no")


class ProgressBridge(QObject):
    """Emitting from a worker thread queues the call onto the GUI thread (Qt AutoConnection)."""

    progress = Signal(object)


def alive(owner) -> bool:
    """Whether the Qt object ``owner`` still exists (closing a window deletes its widgets
    while their Python objects live on)."""
    try:
        from qtpy import sip

        return not sip.isdeleted(owner)
    except ImportError:  # PySide
        from qtpy import shiboken

        return shiboken.isValid(owner)


def while_alive(owner, callback: Callable) -> Callable:
    """``callback``, run only while ``owner`` exists: a worker that ends after its dock was
    closed (with the window, say) must not touch the dock's deleted widgets."""

    def guarded(*args):
        if alive(owner):
            callback(*args)

    return guarded


def start(
    func: Callable[[], object],
    on_done: Callable[[object], None],
    on_error: Callable[[BaseException], None],
    on_finished: Callable[[], None],
    *,
    owner: QObject,
):
    """Run ``func`` in a napari thread worker; return the worker (None when synchronous).

    The callbacks run on the GUI thread, and only while ``owner`` (the dock or panel that
    started the work) exists.
    """
    if synchronous():
        try:
            result = func()
        except Exception as exc:  # reported like a worker error
            on_error(exc)
        else:
            on_done(result)
        finally:
            on_finished()
        return None
    from napari.qt.threading import create_worker

    def guarded():
        # errors travel as values: napari's worker would also report them to
        # its own exception hook; the dock shows one clear notification instead
        try:
            return func()
        except Exception as exc:
            return _Failed(exc)

    def returned(value):
        if isinstance(value, _Failed):
            on_error(value.exc)
        else:
            on_done(value)

    return _launch(create_worker(guarded, _start_thread=False), while_alive(owner, returned),
                   while_alive(owner, on_error), while_alive(owner, on_finished))


class _Failed:
    """An exception carried as a worker's return value."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


#: at interpreter exit, how long running workers are given to end (they are asked to)
EXIT_WAIT_S = 60


def _wait_at_exit() -> None:
    """Let running workers end before Python and Qt tear down: a worker still running then
    emits its signals through deleted Qt objects, and PyQt aborts the process (a script that
    closes the viewer and ends, or a window closed seconds after a dock opened)."""
    from qtpy.QtCore import QThreadPool

    for worker in list(_LIVE):
        worker.quit()  # loops stop at their next step; a function runs to its end
    for pool in (QThreadPool.globalInstance(), _loop_pool):
        if pool is not None:
            pool.waitForDone(int(EXIT_WAIT_S * 1000))


def _launch(worker, returned, on_error, on_finished, pool=None):
    global _exit_hook
    if not _exit_hook:
        import atexit

        atexit.register(_wait_at_exit)
        _exit_hook = True
    worker.returned.connect(returned)
    worker.errored.connect(on_error)
    worker.finished.connect(on_finished)
    # a worker lives until it ends, even when the dock that started it is closed
    _LIVE.add(worker)
    worker.finished.connect(lambda: _LIVE.discard(worker))
    if pool is None:
        worker.start()
    else:
        pool.start(worker)
    return worker


#: loops that run at once, each on a thread of its own (one live mode per open Fine-tune dock)
LOOP_THREADS = 8
_loop_pool = None


def loop_pool():
    """The thread pool of :func:`start_loop`, apart from napari's global pool.

    The global pool has as many threads as the machine has cores (two on a
    laptop); a loop that runs as long as live mode does would hold one of them
    and every other worker (Segment, the summary, Compare, export) would queue
    behind it. When the application quits, the loops are asked to end and
    waited for, as napari does for its own workers.
    """
    global _loop_pool
    if _loop_pool is None:
        from qtpy.QtCore import QCoreApplication, QThreadPool

        _loop_pool = QThreadPool()
        _loop_pool.setMaxThreadCount(LOOP_THREADS)
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(_quit_loops)
    return _loop_pool


def _quit_loops() -> None:
    for worker in list(_LIVE):
        worker.quit()
    _loop_pool.waitForDone()


def start_loop(
    func: Callable[[], Iterator],
    on_yield: Callable[[object], None],
    on_done: Callable[[object], None],
    on_error: Callable[[BaseException], None],
    on_finished: Callable[[], None],
    *,
    owner: QObject,
):
    """Run the generator ``func()`` in a napari thread worker on a thread of its own
    (:func:`loop_pool`, never one of the global pool's): every value it yields reaches
    ``on_yield`` on the GUI thread, its return value ``on_done`` (each only while ``owner``
    exists). Always a thread (a loop that runs until it is told to stop cannot run
    synchronously). Returns the worker."""
    from napari.qt.threading import create_worker

    def guarded():
        try:
            return (yield from func())
        except Exception as exc:  # one clear notification, as in start()
            return _Failed(exc)

    def returned(value):
        if isinstance(value, _Failed):
            on_error(value.exc)
        else:
            on_done(value)

    worker = create_worker(guarded, _start_thread=False)
    worker.yielded.connect(while_alive(owner, on_yield))
    return _launch(worker, while_alive(owner, returned), while_alive(owner, on_error),
                   while_alive(owner, on_finished), loop_pool())


_LIVE: set = set()
_exit_hook = False


def running() -> int:
    """How many workers started here have not finished."""
    return len(_LIVE)


class WorkerDockMixin:
    """What both docks do around a worker: end a run, report an error."""

    def _end_run(self) -> None:
        self.controller.running = False
        self.worker = None
        if self._progress is not None:
            self._progress.close()
            self._progress = None

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(message)
        show_error(message)
