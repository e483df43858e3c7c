"""The error hierarchy: what the user must fix versus what is a fault of fffcompile.

- ``UserError``: bad input (a file that is not ONNX, an invalid spec, a wrong option). The CLI
  prints its message as one line and exits 2. Messages say what to do.
- ``VerificationError``: the optimized model does not match the original within tolerance.
  The CLI exits 1.
- ``InternalError``: a bug in fffcompile. Its message asks for a report; the CLI shows the
  traceback only with ``FFFCOMPILE_DEBUG=1``.
"""


class FFFCompileError(Exception):
    """Base of every error fffcompile raises on purpose."""


class UserError(FFFCompileError):
    """The input or the options are wrong; the message says what to change."""

    exit_code = 2


class InvalidSpecError(UserError, ValueError):
    """An FFFSpec field is inconsistent; the message names the field."""


class InvalidModelError(UserError):
    """The model or file cannot be read or run as given."""


class MissingDependencyError(UserError):
    """An optional backend (triton, tensorrt, ...) is not installed; the message says how to get it."""


class VerificationError(FFFCompileError):
    """The optimized model does not match the original; carries the comparison."""

    exit_code = 1

    def __init__(self, message: str, comparison=None):
        super().__init__(message)
        self.comparison = comparison


class InternalError(FFFCompileError):
    """A fault in fffcompile itself, never the user's."""

    exit_code = 3

    def __init__(self, message: str):
        super().__init__(f"{message} (this is a bug in fffcompile; please report it with the model that triggers it)")
