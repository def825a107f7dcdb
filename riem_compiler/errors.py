"""Errors a user can act on. Library code raises these instead of letting deep tracebacks out."""


class RiemError(Exception):
    """Base class of every error riem_compiler raises on purpose."""


class InputError(RiemError, ValueError):
    """The model, file or option given is not usable; the message says what to do."""


class FitError(RiemError):
    """Fitting a layer failed (non-finite values, error ceiling missed)."""
