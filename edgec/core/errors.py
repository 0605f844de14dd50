"""The one exception tree of edgec.

Every failure a user can cause or fix is an :class:`EdgecError`; its message
says what was found and what to do. The CLI prints ``Error: <message>`` and
exits with status 1; anything else escaping is a bug in edgec.
"""

from __future__ import annotations


class EdgecError(Exception):
    """Root of all edgec errors."""


class LoadError(EdgecError):
    """The model file is missing, corrupt, unsafe to load, or not a model."""


class InputShapeError(LoadError):
    """The model needs an input shape that was not given, or the given one is bad."""


class TargetError(EdgecError):
    """Unknown target preset or bad target option."""


class ToolchainError(TargetError):
    """A compiler the target needs is not installed."""


class UnsupportedOpError(EdgecError):
    """The graph holds operators edgec cannot lower."""


class PassError(EdgecError):
    """A graph pass was misconfigured or its preconditions do not hold."""


class BuildError(EdgecError):
    """TVM lowering, building or exporting failed."""


class TuningError(EdgecError):
    """Tuning could not start or produced nothing usable, or a tuning database is missing."""


class VerificationError(EdgecError):
    """The compiled model's outputs differ from the reference beyond tolerance."""


class ArtifactError(EdgecError):
    """An artifact directory is missing, incomplete, or would be clobbered."""


class InputDataError(EdgecError):
    """Input data given to run/bench does not fit the model."""


class OutputError(EdgecError):
    """A result file cannot be written where it was asked for."""


class DeviceError(EdgecError):
    """A device (local or over RPC) could not be reached, or failed during a run."""


class NoCudaDeviceError(DeviceError):
    """A CUDA artifact needs a GPU here and a piece is missing: the CUDA runtime, the driver, or a GPU."""

    def __init__(self, what: str):
        super().__init__(f"no CUDA device: {what}")


class AgentBuildError(BuildError):
    """Cross-building the native device agent (edgec-agent) failed."""


class EmulatorError(DeviceError):
    """qemu-user is missing, or an emulated device agent did not start."""
