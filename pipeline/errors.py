"""Errors of `pipeline`.

Every error a user can meet is a subclass of :class:`PipelineError`, whose message says what
went wrong and what to do. The command line maps them to exit codes in one place
(``pipeline.cli``)::

    PipelineError                      exit 2 unless stated
    ├── ConfigError                    a config file is wrong (names the file, column and fix)
    ├── RunNotFoundError               unknown run id
    ├── RunExistsError                 the run id is already taken
    ├── RunInUseError                  `pipeline rm` or `resume --config` of a run that live workers still hold
    ├── InvalidRunIdError              the run id does not match [A-Za-z0-9][A-Za-z0-9._-]{0,63}
    ├── ReadOnlyQueryError             `pipeline sql` refused a text: not one statement that only reads
    ├── StoreError                     the state store cannot be used (schema out of date, ...)
    ├── HomeError                      the home folder, or a run's folder in it, cannot be made
    ├── EngineError                    exit 1: the engine failed while running (a bug, or a
    │                                  recorded value it cannot read); finished work is kept
    ├── UnknownColumnError             a column name the run does not have (`retry --column`)
    ├── DamagedFileError               a checkpointed row-group file is missing or damaged
    ├── ExportError                    the export file could not be written (the target is unchanged)
    ├── ModelCheckError                a model endpoint the config uses is unreachable, or refuses
    │                                  the key or the model (the preflight of `run`/`validate`)
    ├── FilesChangedError              a python module or seed file changed since the run started
    ├── RunningLoopError               the sync API was called where an event loop runs (Jupyter):
    │                                  use pipeline.arun/aresume/aretry (nothing was created)
    ├── UndeclaredColumnError          a python cell read a column it did not declare in
    │                                  `requires` (also a KeyError)
    ├── GenerationError                a generator failed for good (the cell or row group fails);
    │   │                              carries the original as __cause__ where there is one
    │   ├── ModelRequestError          the endpoint refused the request (a 4xx other than 408,
    │   │                              409, 429; a redirect; a base_url that is not http(s))
    │   └── ModelOutputError           the model answered, but nothing usable (no text, JSON that
    │                                  does not parse or validate after the re-asks)
    ├── UnstorableValueError           a generator's value has no exact stored form: fails its
    │                                  own cell (never retried), names column, record and why
    └── RetryableError                 raise it (or TimeoutError / ConnectionError) from a
        ├── ModelRateLimitError        generator to have the task deferred and tried again
        ├── ModelTimeoutError
        ├── ModelServerError
        └── ModelConnectionError
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DamagedFileError",
    "EngineError",
    "ExportError",
    "FilesChangedError",
    "GenerationError",
    "HomeError",
    "InvalidRunIdError",
    "ModelCheckError",
    "ModelConnectionError",
    "ModelOutputError",
    "ModelRateLimitError",
    "ModelRequestError",
    "ModelServerError",
    "ModelTimeoutError",
    "PipelineError",
    "ReadOnlyQueryError",
    "RetryableError",
    "RunExistsError",
    "RunInUseError",
    "RunNotFoundError",
    "RunningLoopError",
    "StoreError",
    "UndeclaredColumnError",
    "UnknownColumnError",
    "UnstorableValueError",
    "is_outage",
    "is_retryable",
]


class PipelineError(Exception):
    """Root of every error `pipeline` raises on purpose."""

    exit_code = 2


class ConfigError(PipelineError):
    """A config file is wrong. The message names the file, the column and the fix."""

    def __init__(self, message: str, *, path: object = None, column: str | None = None):
        where = []
        if path is not None:
            where.append(str(path))
        if column is not None:
            where.append(f"column '{column}'")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.path = path
        self.column = column


class RunNotFoundError(PipelineError):
    """No run with this id exists in the state store."""


class RunExistsError(PipelineError):
    """A run with this id exists already."""


class RunInUseError(PipelineError):
    """The run has live workers or leases, so it cannot be deleted (``rm``) or changed
    (``resume --config``) now: stop them first."""


class InvalidRunIdError(PipelineError):
    """The run id does not have the allowed form."""


class ReadOnlyQueryError(PipelineError):
    """`pipeline sql` only reads: the text is not one statement that only reads (the message says why)."""


class StoreError(PipelineError):
    """The state store cannot be used as it is."""


class HomeError(PipelineError):
    """The home folder (``--home``, ``$PIPELINE_HOME``, ``./.pipeline`` by default), or a run's
    folder in it, cannot be created: a read-only place, no permission, a file in the way. The
    message names the folder and says where to point the home instead."""


class EngineError(PipelineError):
    """The engine failed while running; what finished is recorded and the run is resumable."""

    exit_code = 1


class UnknownColumnError(PipelineError):
    """A column or generator name that the run does not have."""


class DamagedFileError(PipelineError):
    """A checkpointed row group's file is missing, or its size or digest differs from what its
    checkpoint recorded. ``pipeline resume RUN_ID --repair`` computes those row groups again."""


class ExportError(PipelineError):
    """The export could not be written; whatever was at the target path is unchanged."""


class ModelCheckError(PipelineError):
    """A model endpoint the config uses cannot be reached, or refuses the key or the model
    (pipeline.llm.preflight). The message names the alias and the URL, never the key."""


class FilesChangedError(PipelineError):
    """A python module or seed file the run reads changed since the run started
    (pipeline.fingerprints). The message names the files and says what --accept-changes does."""


class RunningLoopError(PipelineError):
    """A sync function of the API (run, resume, retry) was called in a thread whose event loop
    is running (a Jupyter notebook, an async program). Nothing was created or changed; the
    message names the async twin to await instead."""


class UndeclaredColumnError(PipelineError, KeyError):
    """A python column's function read a column of the record that its ``requires`` does not
    list (``row["title"]``). A KeyError too, so code that catches KeyError still does; the
    message names the column and the ``requires`` to add."""

    def __str__(self) -> str:  # KeyError's would quote the whole message
        return str(self.args[0]) if self.args else ""


class GenerationError(PipelineError):
    """A generator failed for good; the original exception, where there is one, is the ``__cause__``."""


class ModelRequestError(GenerationError):
    """The endpoint refused the request (a 4xx other than 408, 409 and 429). Not retryable:
    the same request would be refused again. Fix the config, the key or the prompt."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class ModelOutputError(GenerationError):
    """The model answered, but the answer cannot be used. Not retryable."""


class UnstorableValueError(PipelineError):
    """A value with no exact stored form (text that is not valid Unicode, a dict with non-string
    keys, an object with no JSON form: see pipeline.values). Raised when the task finishes; it
    fails that cell and the run goes on (contract section 9)."""


class RetryableError(PipelineError):
    """A failure worth another attempt: the task is deferred and retried after its backoff."""


class ModelRateLimitError(RetryableError):
    """The model endpoint answered 429."""

    def __init__(self, message: str = "rate limited (HTTP 429)", *, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelTimeoutError(RetryableError):
    """The model endpoint did not answer in time (timeout or HTTP 408)."""


class ModelServerError(RetryableError):
    """The model endpoint failed (HTTP 5xx or 409)."""


class ModelConnectionError(RetryableError):
    """The model endpoint could not be reached."""


def is_outage(exc: BaseException | None) -> bool:
    """A model endpoint that may be down: it cannot be reached, did not answer in time, or
    answered 5xx/409. The engine pauses the model's columns on a run of these (CONTRACT section 9)
    instead of spending the tasks' attempts."""
    return isinstance(exc, (ModelConnectionError, ModelTimeoutError, ModelServerError))


def is_retryable(exc: BaseException) -> bool:
    """The contract's rule (section 7): RetryableError, TimeoutError and ConnectionError."""
    return isinstance(exc, (RetryableError, TimeoutError, ConnectionError))
